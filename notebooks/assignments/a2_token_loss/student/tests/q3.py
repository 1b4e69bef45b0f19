OK_FORMAT = True

test = {   'name': 'q3',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': '>>> _shares = micro_batch_shares([logits[:1], logits[1:]], [labels[:1], labels[1:]])\n'
                                               '>>> assert len(_shares) == 2\n'
                                               '>>> assert abs(float(sum(_shares)) - float(summed_token_loss(logits, labels)) / 6) < 1e-09\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
