OK_FORMAT = True

test = {   'name': 'q2',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> import copy as _copy\n'
                                               '>>> import torch as _torch\n'
                                               '>>> from accumlab.doctor import make_probe_model as _make_model, num_items as _num_items\n'
                                               '>>> from accumlab.doctor.grading import assert_own_work as _own, call_order as _call_order, one_batch_reference as _reference, window_of as _window\n'
                                               '>>> from accumlab.engine.gradients import gradient_vector as _gradient, relative_difference as _rel\n'
                                               '>>> from accumlab.doctor.grading import substitute as _substitute\n'
                                               '>>> from accumlab.engine.window import accumulate_gradients as _exact\n'
                                               ">>> _own(window_step, allowed=[_num_items], skip=['accumulate'], hint='Write it with torch and your accumulate.')\n"
                                               '>>> _m = _make_model()\n'
                                               '>>> _steps = []\n'
                                               '>>> class _Opt(_torch.optim.SGD):\n'
                                               '...     def step(self, closure=None):\n'
                                               "...         _steps.append('step')\n"
                                               '...         return super().step(closure)\n'
                                               '>>> _opt = _Opt(_m.parameters(), lr=0.1)\n'
                                               '>>> _sched = _torch.optim.lr_scheduler.LambdaLR(_opt, lambda s: 1.0)\n'
                                               '>>> _w = _window([(9, 9)] * 4, seed=3)\n'
                                               '>>> _ref_loss, _ = _reference(_m, _w)\n'
                                               ">>> with _substitute(window_step, accumulate=lambda m, mb: _exact(m, mb, task='causal_lm')):\n"
                                               '...     _loss = window_step(_m, _opt, _w, 4, scheduler=_sched)\n'
                                               ">>> assert _steps == ['step'], f'optimizer.step ran {len(_steps)} times in one window'\n"
                                               ">>> assert _sched.last_epoch == 1, f'the scheduler stepped {_sched.last_epoch} times in one window'\n"
                                               ">>> assert all((p.grad is None or float(p.grad.abs().max()) == 0.0 for p in _m.parameters())), 'gradients were not zeroed after the step'\n"
                                               ">>> assert abs(float(_loss) - _ref_loss) < 1e-05, f'window_step returned {_loss}, but L_W = {_ref_loss:.6f}'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
