"""The pipeline's only entry point: Hydra composes conf/ and hands the config to one stage."""

import sys

import hydra
from omegaconf import DictConfig

from stages import get_stage
from stages.errors import UserError, one_line


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    try:
        return get_stage(cfg.stage.name)(cfg)
    except UserError as err:
        # A user's mistake gets one line, not a traceback; exit non-zero.
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
