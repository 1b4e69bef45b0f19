OK_FORMAT = True

test = {   'name': 'q3',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.doctor.grading import assert_own_work as _own\n'
                                               ">>> _own(noise_scale, hint='Write the estimator yourself.')\n"
                                               '>>> def _pair(grad_sq, trace, small, big):\n'
                                               "...     return {'small_sq': grad_sq + trace / small, 'small_items': small, 'big_sq': grad_sq + trace / big, 'big_items': big}\n"
                                               '>>> _b = noise_scale([_pair(2.0, 30.0, 4, 16)])\n'
                                               ">>> assert abs(float(_b) - 15.0) < 1e-09, f'noise_scale gave {_b} for |G|^2 = 2, tr(Sigma) = 30; expected 15'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
