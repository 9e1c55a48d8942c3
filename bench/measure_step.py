"""The child process of `step_common.measure_isolated`: measures one step, prints one line.

  python -m bench.measure_step jax|torch '<StepSpec as JSON>'

A module of its own, so that `step_common` (what both steps share) imports neither step.
"""

from __future__ import annotations

import json
import sys

from bench import step_common


def main(framework: str, spec_json: str) -> None:
    spec = step_common.StepSpec(**json.loads(spec_json))
    if framework == 'jax':
        from bench import train_step_speed
        result = train_step_speed.measure(spec)
    else:
        try:    # torch and the references are optional: a missing one is reported, not raised
            from bench import torch_step
            result = torch_step.measure(spec)
        except ImportError as e:   # torch_reference's message names the install command
            why = str(e)
            result = {'missing': why if 'pip install' in why
                      else f'{why}; {step_common.INSTALL_REFERENCE}'}
    print(step_common.RESULT_MARK + json.dumps(result), flush=True)


if __name__ == '__main__':
    main(*sys.argv[1:])
