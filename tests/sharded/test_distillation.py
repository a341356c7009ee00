"""Distillation under FSDP2 (two gloo processes, ``ModelParallelStrategy``): the teacher cache shared across
ranks by dataset index (resumed from the distributed checkpoint), feature projections sharded with the
student, and a teacher sharded by choice; each against one process on the same global batches."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_slim import KnowledgeDistillation, OnlineDataSelection
from lightning_slim.batches import BatchFormatError
from lightning_slim.distillation.cache_keys import CacheKeys
from lightning_slim.distillation.callback import PROJECTIONS
from lightning_slim.distillation.functional import Projection

# The two-process runs differ from one process in float32 summation order only (two reduce-scattered halves
# of the batch's gradient against one sum): measured at most 1.2e-7 (12 steps, lr 0.1, momentum 0.9) on weights
# of size 0.05-1. The cached teacher outputs were bit-identical here (the digest equals one process's), but a
# CPU whose kernels give the teacher's 4-row and 8-row forwards different last bits could round a float16 top-k
# log-probability one ulp apart (2^-8 at these magnitudes): one target probability moves by 0.4% of itself,
# a gradient of order 1e-6 at lr 0.1, inside 1e-5. And 1e-5 is far below what the terms move: the KD term
# moves the student 8e-2 from plain training, the feature term the projections 6e-3 from their start (measured),
# so outputs of other examples (one in 48 given another's, measured: 2e-4) or projections trained apart fail it.
WEIGHT_TOLERANCE = 1e-5
ONE_PROCESS = ["llama_kd_cache", "llama_kd_repeats", "llama_kd_features"]


def weights(evidence, scenario: str, run: str) -> dict[str, torch.Tensor]:
    return evidence.tensors(scenario, run)["weights"]


def distillation(evidence, scenario: str, run: str = "fsdp") -> list[dict]:
    """Each rank's distillation record (one for ``run="single"``)."""
    ranks = evidence.record[run][scenario]
    return [r["distillation"] for r in (ranks if isinstance(ranks, list) else [ranks])]


@pytest.mark.parametrize("scenario", ONE_PROCESS)
def test_weights_equal_the_one_process_weights(evidence, scenario):
    sharded, single = weights(evidence, scenario, "fsdp"), weights(evidence, scenario, "single")
    assert sharded.keys() == single.keys()
    for key, value in single.items():
        torch.testing.assert_close(sharded[key], value, rtol=0, atol=WEIGHT_TOLERANCE, msg=key)  # see its definition


# --- the cache, by global example index --------------------------------------------------------------------
@pytest.mark.parametrize(
    "scenario, run, examples",
    [("llama_kd_cache", "fsdp", 48), ("llama_kd_cache", "resumed", 48), ("llama_kd_repeats", "fsdp", 12)],
)
def test_every_rank_holds_every_example_of_the_cache(evidence, scenario, run, examples):
    ranks = distillation(evidence, scenario, run)
    assert all(r["cache_rows"] == examples for r in ranks), ranks  # both ranks' halves of the data, on each
    assert len({r["cache_digest"] for r in ranks}) == 1, ranks  # bit for bit the same cache on every rank


def test_the_second_epoch_is_served_from_the_cache_on_every_rank(evidence):
    for r in distillation(evidence, "llama_kd_cache"):
        # epoch 1: the teacher ran on this rank's 24 examples once each; epoch 2 (reshuffled: half of each
        # rank's examples were computed by the other rank) came from the cache, no teacher pass
        assert (r["teacher_examples"], r["teacher_passes"]) == (24, 6), r
        assert (r["cache_hits"], r["student_examples"]) == (24, 48), r
    single = distillation(evidence, "llama_kd_cache", "single")[0]
    assert (single["teacher_examples"], single["cache_hits"]) == (48, 48)


def test_the_ranks_run_the_teacher_as_often_as_one_process(evidence):
    # twelve examples, each four times: an example one rank computed is served from the cache on the other
    # (a rank-local cache would compute each example once on each rank that sees it); as in one process, the
    # teacher runs only where a step's global batch holds an example not seen before, once more where it holds
    # it twice (on two ranks, or twice in one process's batch)
    ranks, single = distillation(evidence, "llama_kd_repeats"), distillation(evidence, "llama_kd_repeats", "single")[0]
    assert sum(r["teacher_examples"] for r in ranks) == single["teacher_examples"] == 16, ranks
    assert sum(r["cache_hits"] for r in ranks) == single["cache_hits"] == 32, ranks


def test_the_resumed_cached_fit_ends_where_the_uninterrupted_fit_ends(evidence):
    whole, resumed = weights(evidence, "llama_kd_cache", "fsdp"), weights(evidence, "llama_kd_cache", "resumed")
    # the same two processes, the same teacher outputs (the cache restored from rank 0's state is every
    # rank's, see the digests): the same float operations in the same order, so bit-identical weights
    assert whole.keys() == resumed.keys() and f"{PROJECTIONS}.0.linear.weight" in whole  # the projection too
    for key, value in whole.items():
        assert torch.equal(resumed[key], value), key
    assert all(r["distillation"]["projections_sharded"] for r in evidence.record["resumed"]["llama_kd_cache"])
    for rank in evidence.record["resumed"]["llama_kd_cache"]:
        assert rank["stopped_at"] == 6 and rank["steps"] == 12, rank  # stopped after epoch 1 of 2
        assert any(name.endswith(".distcp") for name in rank["checkpoint_files"]), rank
        # epoch 2 after the resume: every example from the restored cache, also on rank 1, whose own
        # epoch-1 entries reached the checkpoint only through the sharing (Lightning saves rank 0's state)
        assert rank["distillation"]["cache_hits"] == 24 and rank["distillation"]["teacher_passes"] == 6, rank
    assert (
        distillation(evidence, "llama_kd_cache", "resumed")[0]["cache_digest"]
        == (distillation(evidence, "llama_kd_cache")[0]["cache_digest"])
    )


# --- feature projections -----------------------------------------------------------------------------------
def test_feature_projections_are_sharded_and_trained(evidence):
    ranks, single = (
        distillation(evidence, "llama_kd_features"),
        distillation(evidence, "llama_kd_features", "single")[0],
    )
    assert all(r["projections_sharded"] for r in ranks) and not single["projections_sharded"]
    assert sum(r["projection_bytes"] for r in ranks) == single["projection_bytes"] > 0
    assert all(r["projection_bytes"] == single["projection_bytes"] // 2 for r in ranks)  # 48 rows: 24 each
    trained = weights(evidence, "llama_kd_features", "fsdp")[f"{PROJECTIONS}.0.linear.weight"]
    initial = Projection(
        32, 48, 2, torch.Generator().manual_seed(0)
    ).linear.weight.detach()  # build_projections' (seed 0)
    assert trained.shape == initial.shape
    assert float((trained - initial).abs().max()) > 100 * WEIGHT_TOLERANCE  # the feature term trained them


def test_the_recorded_features_of_sharded_layers_give_the_one_process_term(evidence):
    """WATCH_STEP on a decoder layer FSDP2 shards: each rank's term of the last step is over its half of the batch
    (the same number of tokens each), so their mean is the one-process term."""
    ranks, single = (
        distillation(evidence, "llama_kd_features"),
        distillation(evidence, "llama_kd_features", "single")[0],
    )
    for name in ("feature_loss", "kd_loss"):
        mean = sum(r["logged"][name] for r in ranks) / len(ranks)
        # the weights it is computed from differ by 2e-8 (see WEIGHT_TOLERANCE): a relative 1e-4 bounds it widely
        assert mean == pytest.approx(single["logged"][name], rel=1e-4), name
    assert ranks[0]["logged"]["feature_loss"] != ranks[1]["logged"]["feature_loss"]  # each saw its own examples


# --- a sharded teacher --------------------------------------------------------------------------------------
def test_a_sharded_teacher_holds_half_per_rank(evidence):
    sharded, replicated = distillation(evidence, "llama_kd_shard_teacher"), distillation(evidence, "llama_kd_repeats")
    whole = replicated[0]["teacher_bytes"]
    assert all(r["teacher_bytes"] == whole for r in replicated)
    assert sum(r["teacher_bytes"] for r in sharded) == whole  # a partition: resharded after every forward
    assert all(0.45 < r["teacher_bytes"] / whole <= 0.55 for r in sharded), sharded  # lm_head's 63 rows: 32/31


def test_a_sharded_teacher_trains_the_student_as_a_replicated_one(evidence):
    sharded, replicated = (
        weights(evidence, "llama_kd_shard_teacher", "fsdp"),
        weights(evidence, "llama_kd_repeats", "fsdp"),
    )
    # its forward gathers the exact parameters and computes what the replicated teacher computes: bit for bit
    assert sharded.keys() == replicated.keys()
    for key, value in replicated.items():
        assert torch.equal(sharded[key], value), key
    ranks = distillation(evidence, "llama_kd_shard_teacher")
    # at step 2 rank 0's batch was all cached while rank 1's was not: rank 0 ran the teacher alongside
    # (unused, uncounted), so the gathers matched and the fit finished its 6 steps
    assert [r["teacher_passes"] for r in ranks] == [2, 3], ranks
    assert all(r["steps"] == 6 for r in evidence.ranks("llama_kd_shard_teacher"))


def test_the_report_measures_a_sharded_teacher_whole(evidence):
    """Rank 0 measures the teacher alone: a sharded one is gathered for it first (its forward alone would wait)."""
    reports = {
        name: json.loads((evidence.folder / f"{name}_fsdp_report.json").read_text())
        for name in ("llama_kd_shard_teacher", "llama_kd_repeats")
    }
    sharded, replicated = reports["llama_kd_shard_teacher"], reports["llama_kd_repeats"]
    whole = distillation(evidence, "llama_kd_repeats")[0]["teacher_bytes"] // 4  # float32 parameters
    assert sharded["teacher"]["params"] == replicated["teacher"]["params"] == whole
    assert sharded["teacher"]["macs"] == replicated["teacher"]["macs"] > 0
    rows = [r["techniques"]["distillation"] for r in (sharded, replicated)]
    assert rows[0]["teacher_macs_per_example"] == rows[1]["teacher_macs_per_example"] > 0
    assert "teacher_macs_error" not in rows[0]


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 3)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_sharding_the_teacher_is_refused_unsharded_before_training():
    module = _Tiny()
    before = module.net.weight.detach().clone()
    kd = KnowledgeDistillation(teacher=nn.Linear(4, 3), teacher_sharding="shard")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, callbacks=[kd]
    )
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="teacher_sharding='shard'.*SingleDeviceStrategy.*'replicate', 'shard'"):
        trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 0 and torch.equal(module.net.weight, before)


def test_sharding_a_teacher_another_technique_calls_is_refused_before_training():
    module = _Tiny()
    kd = KnowledgeDistillation(teacher=nn.Linear(4, 3), teacher_sharding="shard")
    select = OnlineDataSelection(keep=0.5, reference="teacher")
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False, callbacks=[select, kd]
    )
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match=r"collective of every rank, which \['OnlineDataSelection'\] would call"):
        trainer.fit(module, DataLoader(data, batch_size=4))
    assert trainer.global_step == 0


def test_teacher_sharding_is_validated_and_expressible_as_a_mapping():
    with pytest.raises(ValueError, match=r"teacher_sharding='fsdp' is not one of \('replicate', 'shard'\)"):
        KnowledgeDistillation(teacher=nn.Linear(4, 3), teacher_sharding="fsdp")
    kd = KnowledgeDistillation(config={"teacher": nn.Linear(4, 3), "teacher_sharding": "shard"})  # a YAML config:
    assert kd.config.teacher_sharding == "shard"
    assert KnowledgeDistillation(teacher=nn.Linear(4, 3)).config.teacher_sharding == "replicate"


def test_the_sharded_cache_needs_dataset_indices():
    keys = CacheKeys("auto", lambda batch: batch[2] if len(batch) > 2 else None)
    keys.require_index("shared across ranks by dataset index")
    with pytest.raises(BatchFormatError, match="key='auto' needs each example's dataset index.*shared across ranks"):
        keys.choose((torch.zeros(2, 4), torch.zeros(2)))
    keys.choose((torch.zeros(2, 4), torch.zeros(2), torch.arange(2)))
    assert keys.keying == "index"
