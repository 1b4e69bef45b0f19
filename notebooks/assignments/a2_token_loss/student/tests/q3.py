OK_FORMAT = True

test = {   'name': 'q3',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.doctor.grading import assert_own_work as _own\n'
                                               '>>> import torch as _torch\n'
                                               ">>> _own(micro_batch_shares, skip=['count_label_tokens', 'summed_token_loss'], hint='Use your count_label_tokens and summed_token_loss.')\n"
                                               '>>> from accumlab.doctor.grading import substitute as _substitute\n'
                                               '>>> from accumlab.engine.losses import count_items as _count_items, summed_loss as _summed_loss\n'
                                               ">>> _correct = dict(count_label_tokens=lambda lb: _count_items(lb, 'causal_lm'), summed_token_loss=lambda lg, lb: _summed_loss(lg, lb, 'causal_lm'))\n"
                                               '>>> _g = _torch.Generator().manual_seed(0)\n'
                                               '>>> _labels = _torch.tensor([[5, 7, 9, 11, 13], [4, 6, 8, -100, -100]])\n'
                                               '>>> _logits = _torch.randn(2, 5, 20, dtype=_torch.float64, generator=_g, requires_grad=True)\n'
                                               '>>> with _substitute(micro_batch_shares, **_correct):\n'
                                               '...     _shares = micro_batch_shares([_logits[:1], _logits[1:]], [_labels[:1], _labels[1:]])\n'
                                               ">>> assert len(_shares) == 2, f'expected one share per micro-batch, got {len(_shares)}'\n"
                                               ">>> assert all((_torch.is_tensor(s) and s.requires_grad for s in _shares)), 'each share must be a tensor you can call .backward() on: .item() or "
                                               "float() returns a number without a gradient'\n"
                                               ">>> _window_loss = float(_summed_loss(_logits, _labels, 'causal_lm')) / 6\n"
                                               ">>> assert abs(float(sum(_shares)) - _window_loss) < 1e-09, f'the shares add up to {float(sum(_shares)):.6f}, the window loss is {_window_loss:.6f}'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
