OK_FORMAT = True

test = {   'name': 'q1',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> import copy as _copy\n'
                                               '>>> import torch as _torch\n'
                                               '>>> from accumlab.doctor import make_probe_model as _make_model, num_items as _num_items\n'
                                               '>>> from accumlab.doctor.grading import assert_own_work as _own, call_order as _call_order, one_batch_reference as _reference, window_of as _window\n'
                                               '>>> from accumlab.engine.gradients import gradient_vector as _gradient, relative_difference as _rel\n'
                                               ">>> _own(accumulate, allowed=[_num_items], hint='Write it with torch and num_items.')\n"
                                               '>>> _m = _make_model()\n'
                                               '>>> _w = _window([(9, 9)] * 4, seed=1)\n'
                                               '>>> _ref_loss, _ref_grad = _reference(_m, _w)\n'
                                               '>>> _loss = accumulate(_m, _w)\n'
                                               ">>> assert isinstance(_loss, float), f'accumulate must return L_W as a float, not {type(_loss).__name__}'\n"
                                               ">>> assert abs(_loss - _ref_loss) < 1e-05, f'accumulate returned {_loss}, but L_W = {_ref_loss:.6f}'\n"
                                               '>>> assert _rel(_gradient(_m), _ref_grad) < 1e-05, "the accumulated .grad differs from one large batch\'s gradient"\n',
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1},
                                   {   'code': '>>> import copy as _copy\n'
                                               '>>> import torch as _torch\n'
                                               '>>> from accumlab.doctor import make_probe_model as _make_model, num_items as _num_items\n'
                                               '>>> from accumlab.doctor.grading import assert_own_work as _own, call_order as _call_order, one_batch_reference as _reference, window_of as _window\n'
                                               '>>> from accumlab.engine.gradients import gradient_vector as _gradient, relative_difference as _rel\n'
                                               ">>> _own(accumulate, allowed=[_num_items], hint='Write it with torch and num_items.')\n"
                                               '>>> _m = _make_model()\n'
                                               '>>> with _call_order(_m) as _events:\n'
                                               '...     _ = accumulate(_m, _window([(9, 9)] * 4, seed=2))\n'
                                               ">>> assert _events == ['forward', 'backward'] * 4, f'calls in order: {_events}; run backward once per micro-batch, right after its forward'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
