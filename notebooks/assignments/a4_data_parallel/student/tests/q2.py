OK_FORMAT = True

test = {   'name': 'q2',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> import copy as _copy\n'
                                               '>>> import torch as _torch\n'
                                               '>>> from accumlab.doctor import make_probe_model as _make_model, num_items as _num_items\n'
                                               '>>> from accumlab.doctor.grading import assert_own_work as _own, call_order as _call_order, one_batch_reference as _reference, window_of as _window\n'
                                               '>>> from accumlab.engine.gradients import gradient_vector as _gradient, relative_difference as _rel\n'
                                               ">>> _own(ddp_window, allowed=[_num_items], skip=['rank_backward'], hint='Use your rank_backward.')\n"
                                               '>>> _m = _make_model()\n'
                                               '>>> _ranks = [_window([(9, 9), (9, 9)], seed=6), _window([(9, 9), (9, 9)], seed=7)]\n'
                                               '>>> _ref_loss, _ref_grad = _reference(_m, [b for w in _ranks for b in w])\n'
                                               '>>> _loss = ddp_window(_m, _ranks)\n'
                                               ">>> assert isinstance(_loss, float) and abs(_loss - _ref_loss) < 1e-05, f'ddp_window returned {_loss!r}, L_W = {_ref_loss:.6f}'\n"
                                               '>>> assert _rel(_gradient(_m), _ref_grad) < 1e-05, f"model\'s .grad is {float(_gradient(_m).norm() / _ref_grad.norm()):.3f} x the window gradient"\n',
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
