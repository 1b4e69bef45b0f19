OK_FORMAT = True

test = {   'name': 'q2',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': '>>> import copy\n'
                                               '>>> _m = copy.deepcopy(model)\n'
                                               '>>> _calls = []\n'
                                               '>>> class _Opt(torch.optim.SGD):\n'
                                               '...     def step(self, closure=None):\n'
                                               "...         _calls.append('step')\n"
                                               '...         return super().step(closure)\n'
                                               '>>> _opt = _Opt(_m.parameters(), lr=0.1)\n'
                                               ">>> _ = window_step(_m, _opt, windows['equal'], 4)\n"
                                               ">>> assert _calls == ['step'], f'optimizer.step ran {len(_calls)} times in one window'\n"
                                               ">>> assert all((p.grad is None or float(p.grad.abs().max()) == 0.0 for p in _m.parameters())), 'gradients were not zeroed after the step'\n",
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
