r"""The data-reduction study (Table 6, Figure 3): SDTL with N = 16 and R only, on real data
reduced to 1/2^x, x = 0..7; the report fits top-1 = a log2(divisor) + b.

  python -m sdtl_jax.main --config=configs/study/data_reduction.py --workdir=runs/reduction
  python -m sdtl_jax.main --config=configs/study/data_reduction.py:demo --workdir=runs/reduce_demo

`demo`: the embedded digits with x = 0..4 (1/32 of the digits' training set would not fill one
batch of 64). `smoke` (tests): 1/64 and 1/128 of the digits' 1,437 training images, 22 and 11,
below the smoke cap of 24 (`data.max_train_examples`, 3 batches of 8), so each fraction trains
on fewer images than the one before; 1/1 and 1/2 would both be cut to the same 24. The subsets
are drawn once per fraction with the run's seed (`data.stratified` draws per class).
"""
from sdtl_jax import config_lib


def get_config(arg=None):
    arg = config_lib.parse_arg(arg, data='imagenet100', model='', demo=False, smoke=False)
    c = config_lib.base(data=arg.data, model=arg.model or None, demo=arg.demo, smoke=arg.smoke)
    dataset = 'digits' if arg.demo or arg.smoke else arg.data
    config_lib.add_study(c, 'data_reduction', dataset=dataset)
    c.study.transfer_num_frozen = 16
    c.study.fractions = tuple(1 / 2 ** x for x in range(8))
    if arg.demo:
        c.study.fractions = tuple(1 / 2 ** x for x in range(5))
    if arg.smoke:
        c.study.fractions = (1 / 64, 1 / 128)
    return c
