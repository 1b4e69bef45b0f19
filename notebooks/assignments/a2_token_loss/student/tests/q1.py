OK_FORMAT = True

test = {   'name': 'q1',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.doctor.grading import assert_own_work as _own\n'
                                               '>>> import torch as _torch\n'
                                               ">>> _own(count_label_tokens, hint='Write it with torch only: this assignment needs nothing from accumlab.')\n"
                                               '>>> _labels = _torch.tensor([[5, 7, 9, 11, 13], [4, 6, 8, -100, -100]])\n'
                                               '>>> _n = count_label_tokens(_labels)\n'
                                               ">>> assert _n == 6, f'count_label_tokens gave {_n} for the example, expected 4 + 2 = 6'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
