"""The pipeline's only entry point: Hydra composes conf/ and hands the config to one stage."""

import sys

import hydra
from omegaconf import DictConfig

# stages.sweep is imported before Hydra resolves the config: it registers the resolvers conf/config.yaml uses.
from stages import get_stage, sweep
from stages.errors import UserError, one_line


def run_stage(cfg: DictConfig) -> dict:
    return get_stage(cfg.stage.name)(cfg)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> dict | None:
    if sweep.in_multirun():
        # A failing job is recorded in its directory and the sweep goes on; SweepFailures lists it at the end.
        return sweep.run_job(cfg, run_stage)
    try:
        return run_stage(cfg)
    except UserError as err:
        # A user's mistake gets one line, not a traceback; exit non-zero.
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
    if sweep.failed_jobs():
        sys.exit(1)
