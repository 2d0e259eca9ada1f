"""Serving speed: one user × N candidates per request, the whole ONNX graph against the split pair
(`funnel export --split`), in onnxruntime on the CPU.

The benchmark model: ESMM (click -> conversion) on the synthetic funnel with a 50-item viewing
history, embedding 16, two MLP towers (``--hidden``, default 256,128). The user side is what a
request knows once: user_id, device, hour, user_age, n_prev_visits, the history and
``--profile`` user-profile fields (default 16; categorical attributes of the user with 2 to 100
values each, a function of user_id, standing in for the gender, age level, occupation, city,
... of production logs, where most of a ranking model's input describes the user); the item
side is the candidate: item_id, item_category, price. The model is trained for one epoch on
``--rows`` rows (speed does not depend on how well it is trained), then exported both ways.

Every request scores ``--candidates`` items for one user, drawn at random (``--distinct``
different requests, cycled). The inputs are encoded beforehand, as a serving system holds its
id maps in memory; only the graph runs are timed:

- ``whole``: ``model.onnx`` on N rows that repeat the user's features beside each candidate's.
- ``split``: ``user.onnx`` once on the user's row, then ``item.onnx`` on the user state and
  the N candidates.

Both give the same scores (the largest difference is printed). The ``--requests`` timed requests
of each contender run in ``--rounds`` alternating rounds after a warm-up; reported per contender:
requests/s (the median over the rounds) and the p50 and p99 latency over all its requests. The
last line is one JSON object.

    python benchmarks/serving.py --candidates 1000 --requests 300 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

USER = ["user_id", "device", "hour", "user_age", "n_prev_visits", "history"]
ITEM = ["item_id", "item_category", "price"]


def with_profile(frame: pd.DataFrame, fields: int) -> pd.DataFrame:
    """``fields`` user-profile columns ``profile_k``: a fixed attribute of each user (2..100 values)."""
    user = frame["user_id"].str[1:].astype(np.int64).to_numpy()
    sizes = np.geomspace(2, 100, fields).astype(np.int64) if fields else []
    for k, size in enumerate(sizes):
        frame[f"profile_{k}"] = [f"p{v}" for v in (user * (2 * k + 7919) + k * 104729) % size]
    return frame


def config(args: argparse.Namespace, data: Path, run_dir: Path) -> dict:
    hidden = [int(h) for h in args.hidden.split(",")]
    tower = {"type": args.tower, "hidden": hidden}
    return {
        "seed": 0,
        "run_dir": str(run_dir),
        "data": {k: str(data / f"{k}.csv") for k in ("train", "valid", "test")} | {"batch_size": 1024},
        "features": [
            {"name": "user_id", "kind": "categorical"},
            {"name": "item_id", "kind": "categorical"},
            {"name": "item_category", "kind": "categorical"},
            {"name": "device", "kind": "categorical"},
            {"name": "hour", "kind": "categorical"},
            {"name": "history", "kind": "sequence", "share_with": "item_id", "max_len": args.history},
            {"name": "price", "kind": "numeric", "transform": "log1p"},
            {"name": "user_age", "kind": "numeric"},
            {"name": "n_prev_visits", "kind": "numeric", "transform": "log1p"},
            *({"name": f"profile_{k}", "kind": "categorical"} for k in range(args.profile)),
        ],
        "funnel": {
            "model": "esmm",
            "embed_dim": 16,
            "tower": tower,
            "stages": [{"name": "click"}, {"name": "conversion", "after": "click"}],
        },
        "trainer": {"max_epochs": 1, "enable_progress_bar": False},
    }


def requests(
    run, frame: pd.DataFrame, user_features: list[str], n: int, candidates: int, seed: int
) -> list[dict[str, torch.Tensor]]:
    """``n`` encoded requests: one random user's features beside ``candidates`` random items."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        user = frame.iloc[int(rng.integers(len(frame)))]
        rows = frame.iloc[rng.integers(len(frame), size=candidates)][ITEM].reset_index(drop=True)
        for c in user_features:
            rows[c] = [user[c]] * candidates
        out.append(run.featurizer.encode(rows, "request", labels=False).tensors())
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def feeds(graph: dict, batch: dict[str, torch.Tensor], keys: dict[str, str]) -> dict[str, np.ndarray]:
    return {i["name"]: np.ascontiguousarray(batch[keys[i["name"]]].numpy()) for i in graph["inputs"]}


def timed(call, feeds_list: list, warmup: int, n: int) -> list[float]:
    for i in range(warmup):
        call(feeds_list[i % len(feeds_list)])
    times = []
    for i in range(n):
        start = time.perf_counter()
        call(feeds_list[i % len(feeds_list)])
        times.append(time.perf_counter() - start)
    return times


def summary(rounds: list[list[float]]) -> dict[str, float]:
    """requests/s: the median over the rounds; p50 and p99 over every request."""
    ordered = sorted(t for r in rounds for t in r)
    return {
        "requests_per_s": round(statistics.median(len(r) / sum(r) for r in rounds), 1),
        "p50_ms": round(1000 * statistics.median(ordered), 3),
        "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--candidates", type=int, default=1000)
    p.add_argument("--requests", type=int, default=300, help="timed requests per contender")
    p.add_argument("--distinct", type=int, default=20, help="different requests, cycled")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5, help="alternating timed rounds per contender")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    p.add_argument("--rows", type=int, default=20_000, help="training rows of the benchmark model")
    p.add_argument("--history", type=int, default=50, help="length of the viewing history")
    p.add_argument("--tower", default="mlp", help="mlp | deepfm | dcn | field_sum | din")
    p.add_argument("--hidden", default="256,128")
    p.add_argument("--profile", type=int, default=16, help="user-profile fields on the user side")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)

    import funnel
    from funnel.data.table import CAT, NUM, bag_key, bag_offsets_key, bag_weights_key, seq_key
    from funnel.export.sides import split_batch
    from funnel.synthetic import SyntheticSpec, generate

    work = Path(tempfile.mkdtemp(prefix="funnel-serving-"))
    (work / "data").mkdir()
    frame = with_profile(generate(SyntheticSpec(rows=args.rows, history_len=args.history, seed=0)), args.profile)
    n = len(frame)
    for name, part in (("train", frame[: n * 8 // 10]), ("valid", frame[n * 8 // 10 : n * 9 // 10])):
        part.to_csv(work / "data" / f"{name}.csv", index=False)
    frame[n * 9 // 10 :].to_csv(work / "data" / "test.csv", index=False)
    user_features = USER + [f"profile_{k}" for k in range(args.profile)]
    run = funnel.fit(config(args, work / "data", work / "run"))
    run.export(work / "whole", "onnx")
    run.export(work / "split", "onnx", split=user_features)
    manifest = {k: json.loads((work / k / "manifest.json").read_text()) for k in ("whole", "split")}
    frame = with_profile(generate(SyntheticSpec(rows=5_000, history_len=args.history, seed=1)), args.profile)
    batches = requests(run, frame, user_features, args.distinct, args.candidates, seed=2)

    def key_of(name: str) -> str:
        if name in ("cat", "num"):
            return {"cat": CAT, "num": NUM}[name]
        kind, feature, *rest = name.split("__")
        if kind == "seq":
            return seq_key(feature)
        return {"ids": bag_key, "offsets": bag_offsets_key, "weights": bag_weights_key}[rest[0]](feature)

    whole_graph = {"inputs": manifest["whole"]["inputs"]}
    user_graph, item_graph = manifest["split"]["graphs"]["user"], manifest["split"]["graphs"]["item"]
    keys = {i["name"]: key_of(i["name"]) for g in (whole_graph, user_graph) for i in g["inputs"]}
    keys |= {i["name"]: key_of(i["name"]) for i in item_graph["inputs"] if not i["name"].startswith("user__")}

    from funnel.export.sides import make_sides
    from funnel.export.split_export import used_features

    lengths = {"history": args.history}
    sides = make_sides(run.featurizer, used_features(run.featurizer, run.model, "model"), user_features, lengths)
    whole_feeds = [feeds(whole_graph, b, keys) for b in batches]
    split_feeds = []
    for b in batches:
        user = {k: v[:1] for k, v in split_batch(b, sides[0]).items()}  # the user's row, once
        split_feeds.append(
            (
                feeds(user_graph, user, keys),
                feeds(
                    item_graph | {"inputs": [i for i in item_graph["inputs"] if not i["name"].startswith("user__")]},
                    split_batch(b, sides[1]),
                    keys,
                ),
            )
        )

    whole_s = session(work / "whole" / "model.onnx", args.threads)
    user_s = session(work / "split" / "user.onnx", args.threads)
    item_s = session(work / "split" / "item.onnx", args.threads)
    state_names = [o["name"] for o in user_graph["outputs"]]

    def run_whole(feed):
        return whole_s.run(None, feed)

    def run_split(feed):
        user_feed, item_feed = feed
        state = user_s.run(None, user_feed)
        return item_s.run(None, {**dict(zip(state_names, state, strict=True)), **item_feed})

    worst = max(
        float(np.abs(a - b).max())
        for w, s in zip(whole_feeds, split_feeds, strict=True)
        for a, b in zip(run_whole(w), run_split(s), strict=True)
    )
    contenders = {"whole": (run_whole, whole_feeds), "split": (run_split, split_feeds)}
    times: dict[str, list[list[float]]] = {name: [] for name in contenders}
    per_round = max(1, args.requests // args.rounds)
    for r in range(args.rounds):  # alternating rounds: a slower spell of the machine hits both
        for name, (call, feed) in contenders.items():
            times[name].append(timed(call, feed, args.warmup if r == 0 else 2, per_round))
    results = {name: summary(rounds) for name, rounds in times.items()}
    ratio = results["split"]["requests_per_s"] / results["whole"]["requests_per_s"]
    print("| graph | requests/s | p50 ms | p99 ms |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['requests_per_s']:,.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |")
    import onnxruntime

    print(
        json.dumps(
            {
                "candidates": args.candidates,
                "requests": args.requests,
                "threads": args.threads,
                "tower": args.tower,
                "hidden": args.hidden,
                "history": args.history,
                "profile_fields": args.profile,
                "whole": results["whole"],
                "split": results["split"],
                "split_vs_whole": round(ratio, 2),
                "max_abs_diff": worst,
                "onnxruntime": onnxruntime.__version__,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
