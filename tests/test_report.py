"""The printed per-checkpoint table."""
from dwk.report import checkpoint_table_text

ROW = dict(id="convnextv2_atto.fcmae_ft_in1k", source="timm", n_kernels=1840, n_dead=3, classified_share=0.912,
           classified_share_tau=0.85, top_clusters=["dog-off 9%"])


def test_training_data_shown_when_known():
    text = checkpoint_table_text([dict(ROW, data="in1k", resolution=224),
                                  dict(ROW, id="planted-x", source="planted"),
                                  dict(id="broken", source="timm", error="CheckpointError: no such model")])
    head, _, trained, planted, failed = text.splitlines()
    assert head.split()[:3] == ["checkpoint", "source", "trained"]
    assert "in1k, 224px" in trained and "91.2%" in trained
    assert planted.split()[2] == "-" and "FAILED" in failed and failed.split()[2] == "-"


def test_no_training_column_without_metadata():
    assert "trained on" not in checkpoint_table_text([ROW])
