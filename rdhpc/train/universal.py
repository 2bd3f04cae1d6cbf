"""DeepSpeed's universal-checkpoint conversion with every torch.load restricted to tensors and
DeepSpeed's plain records (rdhpc.train.checkpoint.safe_torch_load): converting a checkpoint written
by another number of ranks never runs code from it either.

    python -m rdhpc.train.universal --input_folder CKPT/TAG --output_folder CKPT/TAG_universal [...]

The arguments are ds_to_universal's. Its worker processes are forked and inherit the restriction.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from deepspeed.checkpoint import ds_to_universal

    from rdhpc.errors import UserError
    from rdhpc.train.checkpoint import safe_torch_load

    sys.argv = ["ds_to_universal", *(sys.argv[1:] if argv is None else argv)]
    try:
        with safe_torch_load():
            ds_to_universal.main(ds_to_universal.parse_arguments())
    except UserError as exc:
        print(f"rdhpc.train.universal: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
