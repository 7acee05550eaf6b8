"""The printed per-checkpoint table."""
from dwk.report import checkpoint_table_text

ROW = dict(id="convnextv2_atto.fcmae_ft_in1k", source="timm", role="subject", n_kernels=1840, n_dead=3,
           classified_share=0.912, classified_share_tau=0.85, top_clusters=["dog-off 9%"])


def test_training_data_and_roles_shown():
    text = checkpoint_table_text([dict(ROW, data="in1k", resolution=224),
                                  dict(ROW, id="tv", source="torchvision", data="IMAGENET1K_V1", top1=71.878),
                                  dict(ROW, id="null-x", source="random", role="control"),
                                  dict(ROW, id="planted-x", source="planted", role="method-check"),
                                  dict(id="broken", source="timm", error="CheckpointError: no such model")])
    head, _, trained, tv, null, planted, failed = text.splitlines()
    assert head.split()[:4] == ["checkpoint", "role", "source", "trained"]
    assert trained.split()[1] == "trained" and "in1k, 224px" in trained and "91.2%" in trained
    assert "IMAGENET1K_V1, top-1 71.9%" in tv
    assert "control (random init)" in null and "method check (planted)" in planted
    assert "FAILED" in failed and "no such model" in failed


def test_no_training_column_without_metadata():
    assert "trained on" not in checkpoint_table_text([ROW])
