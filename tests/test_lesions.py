"""train.py / evaluate.py --lesions: lesions left out are neither trained (as negatives) nor scored."""
import math

import pytest
import torch

import evaluate
import train
from data import LESIONS, parse_lesions
from model import build_model, load_checkpoint

from test_train import read_log, tiny_args


def test_parse_lesions_canonical_order_and_errors():
    assert parse_lesions("he,ex") == ("EX", "HE")
    assert parse_lesions("MA+CWS") == ("MA", "CWS")
    with pytest.raises(ValueError, match="unknown lesion 'SE'"):
        parse_lesions("SE")
    with pytest.raises(ValueError, match="empty lesion list"):
        parse_lesions(" , ")


@pytest.fixture(scope="module")
def he_run(synth_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("he") / "run"
    args = tiny_args(synth_root, cache_dir, out, "--iters", "4", "--val-every", "2", "--lesions", "HE",
                     "--lr", "1e-2")
    train.run(args)
    return out, args


def test_untrained_lesions_get_no_gradient(he_run):
    # The head's bias of a lesion outside --lesions has no weight decay (train.make_optimizer): with a zero
    # gradient Adam leaves it exactly at its initial value; the trained lesion's bias moves.
    out, args = he_run
    ckpt = load_checkpoint(out / "last.pt")
    torch.manual_seed(args.init_seed)
    from model import config_from_dict
    init = build_model(config_from_dict(ckpt["model_cfg"])).head.bias.detach()
    trained = ckpt["model"]["head.bias"]
    he = LESIONS.index("HE")
    for c in range(len(LESIONS)):
        if c == he:
            assert not torch.equal(trained[c], init[c])
        else:
            assert torch.equal(trained[c], init[c]), LESIONS[c]


def test_validation_scores_only_trained_lesions(he_run):
    out, _ = he_run
    he = LESIONS.index("HE")
    records = read_log(out, "val")
    assert records
    for record in records:
        dice = [float("nan") if record["dice"][name] is None else record["dice"][name] for name in LESIONS]  # NaN: null
        assert [math.isnan(v) for v in dice] == [c != he for c in range(len(LESIONS))]


def test_evaluate_scores_the_checkpoint_lesions(he_run, synth_root, cache_dir, tmp_path):
    out, _ = he_run
    report = evaluate.evaluate_checkpoints([out / "best.pt"], "IDR", synth_root, cache_dir, device="cpu",
                                           out=tmp_path / "r.json", verbose=False)
    assert report["protocol"]["lesions"] == ["HE"]
    block = report["results"]["IDR"]
    assert block["mean_dice"] == block["lesions"]["HE"]["dice"]
    assert block["mean_ap"] == block["lesions"]["HE"]["ap"]
    assert math.isnan(block["lesions"]["EX"]["dice"]) and block["lesions"]["EX"]["pos"] > 0  # counted, not scored
    every = evaluate.evaluate_checkpoints([out / "best.pt"], "IDR", synth_root, cache_dir, device="cpu",
                                          verbose=False, lesions=LESIONS)
    assert not math.isnan(every["results"]["IDR"]["lesions"]["EX"]["dice"])
    assert every["results"]["IDR"]["lesions"]["HE"]["tp"] == block["lesions"]["HE"]["tp"]
