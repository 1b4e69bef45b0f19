OK_FORMAT = True

test = {   'name': 'q2',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.doctor.grading import assert_own_work as _own\n'
                                               '>>> import torch as _torch\n'
                                               ">>> _own(summed_token_loss, hint='Write it with torch only: this assignment needs nothing from accumlab.')\n"
                                               '>>> def _per_token_sum(logits, labels):\n'
                                               '...     total = 0.0\n'
                                               '...     for r in range(labels.shape[0]):\n'
                                               '...         for t in range(labels.shape[1] - 1):\n'
                                               '...             if int(labels[r, t + 1]) != -100:\n'
                                               '...                 total += float(_torch.nn.functional.cross_entropy(logits[r, t], labels[r, t + 1]))\n'
                                               '...     return total\n'
                                               '>>> _g = _torch.Generator().manual_seed(0)\n'
                                               '>>> _labels = _torch.tensor([[5, 7, 9, 11, 13], [4, 6, 8, -100, -100]])\n'
                                               '>>> _logits = _torch.randn(2, 5, 20, dtype=_torch.float64, generator=_g)\n'
                                               '>>> _got = summed_token_loss(_logits, _labels)\n'
                                               ">>> assert abs(float(_got) - _per_token_sum(_logits, _labels)) < 1e-09, f'summed_token_loss gave {float(_got):.6f}, expected {_per_token_sum(_logits, "
                                               "_labels):.6f}'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
