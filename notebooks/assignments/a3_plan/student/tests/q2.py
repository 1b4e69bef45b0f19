OK_FORMAT = True

test = {   'name': 'q2',
    'points': 3,
    'suites': [   {   'cases': [   {   'code': ">>> _p = plan(shape, 256, 1.0, 'fp32', target_tokens=256 * 64, base_lr=0.001, base_tokens=256 * 16, rule='sqrt')\n"
                                               ">>> assert _p['micro_batch'] * _p['accum_steps'] * 256 == 256 * 64 == _p['tokens_per_step']\n"
                                               ">>> assert estimate_memory(shape, _p['micro_batch'], 256, 'fp32')['total'] <= GIB\n"
                                               ">>> assert abs(_p['lr'] - 0.002) < 1e-12\n",
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
