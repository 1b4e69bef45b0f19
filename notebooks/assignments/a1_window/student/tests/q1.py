OK_FORMAT = True

test = {   'name': 'q1',
    'points': 2,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.engine.window import accumulate_gradients\n'
                                               '>>> from accumlab.lab.equivalence import gradient_vector\n'
                                               '>>> import copy\n'
                                               '>>> _m1, _m2 = (copy.deepcopy(model), copy.deepcopy(model))\n'
                                               ">>> _loss = accumulate(_m1, windows['equal'])\n"
                                               ">>> _ref = accumulate_gradients(_m2, windows['equal'], task='causal_lm')\n"
                                               ">>> assert abs(_loss - _ref) < 1e-06, 'the returned loss is not L_W'\n"
                                               '>>> assert (gradient_vector(_m1) - gradient_vector(_m2)).norm() < 1e-06 * gradient_vector(_m2).norm()\n',
                                       'hidden': False,
                                       'locked': False}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
