OK_FORMAT = True

test = {   'name': 'q1',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': ">>> _b = largest_micro_batch(shape, 256, 1.0, 'fp32')\n"
                                               '>>> assert _b >= 1\n'
                                               ">>> assert estimate_memory(shape, _b, 256, 'fp32')['total'] <= GIB\n"
                                               ">>> assert estimate_memory(shape, _b + 1, 256, 'fp32')['total'] > GIB\n",
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
