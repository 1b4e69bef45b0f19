OK_FORMAT = True

test = {   'name': 'q1',
    'points': None,
    'suites': [   {   'cases': [   {   'code': '>>> from accumlab.doctor.grading import assert_own_work as _own\n'
                                               '>>> from accumlab.lab.memory import GIB as _GIB, ModelShape as _Shape, estimate_memory as _estimate, predict_memory as _predict\n'
                                               ">>> _shape = _Shape.gpt2('small')\n"
                                               ">>> _own(largest_micro_batch, allowed=[_predict, _estimate, _Shape], hint='Write the search yourself with predict_memory.')\n"
                                               ">>> _b = largest_micro_batch(_shape, 128, 0.5, 'bf16')\n"
                                               ">>> assert isinstance(_b, int) and _b >= 1, f'largest_micro_batch returned {_b!r}'\n"
                                               ">>> assert _predict(_shape, _b, 128, 'bf16')['total'] <= 0.5 * _GIB, f'micro-batch {_b} is predicted above the budget'\n"
                                               ">>> assert _predict(_shape, _b + 1, 128, 'bf16')['total'] > 0.5 * _GIB, f'micro-batch {_b + 1} also fits: {_b} is not the largest'\n",
                                       'hidden': False,
                                       'locked': False,
                                       'points': 1}],
                      'scored': True,
                      'setup': '',
                      'teardown': '',
                      'type': 'doctest'}]}
