OK_FORMAT = True

test = {   'name': 'q1',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> import copy as _copy\n'
                                               '>>> import torch as _torch\n'
                                               '>>> from accumlab.doctor import make_probe_model as _make_model, num_items as _num_items\n'
                                               '>>> from accumlab.doctor.grading import assert_own_work as _own, call_order as _call_order, one_batch_reference as _reference, window_of as _window\n'
                                               '>>> from accumlab.engine.gradients import gradient_vector as _gradient, relative_difference as _rel\n'
                                               ">>> _own(rank_backward, allowed=[_num_items], hint='Write it with torch and num_items.')\n"
                                               '>>> def _simulate(model, rank_windows, step):\n'
                                               '...     n = sum((_num_items(b) for w in rank_windows for b in w))\n'
                                               '...     replicas = [_copy.deepcopy(model) for _ in rank_windows]\n'
                                               '...     parts = [step(m, w, n, len(rank_windows)) for m, w in zip(replicas, rank_windows)]\n'
                                               '...     return (sum((float(p) for p in parts)), _torch.stack([_gradient(m) for m in replicas]).mean(0))\n'
                                               '>>> _m = _make_model()\n'
                                               '>>> _ranks = [_window([(9, 9), (9, 9)], seed=1), _window([(9, 9), (9, 9)], seed=2)]\n'
                                               '>>> _ref_loss, _ref_grad = _reference(_m, [b for w in _ranks for b in w])\n'
                                               '>>> _loss, _grad = _simulate(_m, _ranks, rank_backward)\n'
                                               '>>> assert abs(_loss - _ref_loss) < 1e-05, f"the ranks\' parts add up to {_loss:.6f}, L_W = {_ref_loss:.6f}"\n'
                                               '>>> assert _rel(_grad, _ref_grad) < 1e-05, f"DDP\'s average of the ranks\' gradients is {float(_grad.norm() / _ref_grad.norm()):.3f} x the window '
                                               'gradient"\n',
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
