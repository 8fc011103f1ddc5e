"""Train a histoseg model: ``python train.py dataset=monuseg model=resunet loss=dice_ce``."""
import hydra
from omegaconf import DictConfig

import histoseg  # noqa: F401  (registers config resolvers)
from histoseg.tasks.utils import report_user_errors


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@report_user_errors
def main(cfg: DictConfig) -> float | None:
    # imported here, not at the top: --help, --cfg job and tab completion stay fast
    from histoseg.tasks.train import run

    return run(cfg)


if __name__ == "__main__":
    main()
