OK_FORMAT = True

test = {   'name': 'q2',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': '>>> _expected = sum((float(F.cross_entropy(logits[r, t], labels[r, t + 1])) for r, n in ((0, 5), (1, 3)) for t in range(n - 1)))\n'
                                               '>>> assert abs(float(summed_token_loss(logits, labels)) - _expected) < 1e-09\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
