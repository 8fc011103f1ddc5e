"""last.ckpt holds the latest epoch even when that epoch is not the best (Lightning 2.6 changed this)."""
import torch


def test_last_ckpt_is_the_latest_epoch_and_best_is_kept(make_cfg, tmp_path):
    from histoseg.tasks.train import train

    # monitoring the epoch number, minimised: epoch 0 is the best for good, later epochs never enter the top-1
    cfg = make_cfg("trainer.max_epochs=2", "test=false", "monitor=epoch", "monitor_mode=min",
                   "callbacks.validation_panels=null")
    metrics, obj = train(cfg)
    cb = obj["trainer"].checkpoint_callback
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    best = torch.load(cb.best_model_path, map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] == 2 * 2  # 8 samples / batch 4 = 2 steps per epoch
    assert best["epoch"] == 0
    assert cb.last_model_path == str(tmp_path / "checkpoints" / "last.ckpt")
