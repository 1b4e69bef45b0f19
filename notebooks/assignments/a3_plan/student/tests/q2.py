OK_FORMAT = True

test = {   'name': 'q2',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.doctor.grading import assert_own_work as _own\n'
                                               '>>> from accumlab.lab.memory import GIB as _GIB, ModelShape as _Shape, estimate_memory as _estimate, predict_memory as _predict\n'
                                               ">>> _shape = _Shape.gpt2('small')\n"
                                               ">>> _own(plan, allowed=[_predict, _estimate, _Shape], skip=['largest_micro_batch'], hint='Use your largest_micro_batch.')\n"
                                               ">>> _p = plan(_shape, 256, 1.0, 'fp32', target_tokens=256 * 64, base_lr=0.001, base_tokens=256 * 16, rule='sqrt')\n"
                                               ">>> assert _p['micro_batch'] * _p['accum_steps'] * 256 == 256 * 64 == _p['tokens_per_step'], _p\n"
                                               ">>> assert _predict(_shape, _p['micro_batch'], 256, 'fp32')['total'] <= 0.9 * _GIB, 'the micro-batch does not fit 1 GiB less 10% headroom'\n"
                                               '>>> assert _p[\'micro_batch\'] == 8, f"micro-batch {_p[\'micro_batch\']}: the largest divisor of 64 that fits is 8"\n'
                                               '>>> assert abs(_p[\'lr\'] - 0.002) < 1e-12, f"lr {_p[\'lr\']}: 4x the tokens with the square-root rule gives 2x the learning rate"\n',
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
