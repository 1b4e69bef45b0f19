OK_FORMAT = True

test = {   'name': 'q1',
    'points': 1,
    'suites': [{'cases': [{'code': '>>> assert count_label_tokens(labels) == 6\n', 'hidden': False, 'locked': False}], 'scored': True, 'setup': '', 'teardown': '', 'type': 'doctest'}]}
