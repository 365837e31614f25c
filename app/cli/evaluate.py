"""Commands that measure accuracy offline on public data and event files."""
from __future__ import annotations

import json

import click

from app.cli.base import fail, main
from app.config import load_config


@main.group()
def evaluate():
    """Offline accuracy on public benchmarks."""


def event_file_options(f):
    """An event file and `load csv`'s column flags (or the Online Retail format)."""
    for option in reversed([
        click.option("--events", "path", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="Interaction file (CSV, optionally gzipped)."),
        click.option("--format", "fmt", type=click.Choice(["csv", "online-retail"]), default="csv",
                     show_default=True),
        click.option("--user-col"),
        click.option("--item-col"),
        click.option("--ts-col", help="ISO 8601 text (no offset: UTC) or epoch numbers (see --ts-unit)."),
        click.option("--ts-unit", type=click.Choice(["s", "ms"]), default="s", show_default=True),
        click.option("--weight-col", default=None, help="Explicit weight, e.g. a rating."),
        click.option("--type-col", default=None, help="Event type (view, click, cart, purchase, return)."),
    ]):
        f = option(f)
    return f


def model_options(f):
    """Our model's filter, spectral weight and item-bias flags (graph_models.ModelConfig; unset: its defaults)."""
    for option in reversed([
        click.option("--lin-weights", type=click.Choice(["raw", "log1p", "binary"]), default=None,
                     help="Fix our models' filter weights: as stored, log(1 + w), or 1 per edge (default: chosen)."),
        click.option("--lin-user-weights", type=click.Choice(["raw", "log1p", "binary"]), default=None,
                     help="The same for the scored shopper's own row (default: as --lin-weights)."),
        click.option("--alpha", type=float, default=None,
                     help="Fix the weight of our models' low-pass block (default: chosen on validation)."),
        click.option("--item-bias", type=click.FloatRange(0), default=None,
                     help="Fix the temperature of our models' item biases (0: none; default: chosen on validation)."),
    ]):
        f = option(f)
    return f


def _chosen(lin_weights, lin_user_weights, alpha, item_bias) -> dict:
    """The model flags that were given, as ModelConfig fields."""
    chosen = {"lin_weights": lin_weights, "lin_user_weights": lin_user_weights, "alpha": alpha,
              "bias_temperature": item_bias}
    return {k: v for k, v in chosen.items() if v is not None}


@evaluate.command("gowalla")
@click.option("--data-dir", default="../shared/data/gowalla", show_default=True,
              type=click.Path(exists=True, file_okay=False), help="Holds train.txt.gz and test.txt.gz.")
@click.option("--epochs", type=int, default=None, help="Override the number of epochs.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_gowalla(data_dir, epochs, lin_weights, lin_user_weights, alpha, item_bias, out):
    """Train on the LightGCN Gowalla split; Recall/NDCG@20 of ours, tuned ItemKNN, GF-CF and popularity."""
    from graph_models.gowalla import run_evaluation
    fixed = _chosen(lin_weights, lin_user_weights, alpha, item_bias)
    _evaluate(lambda mcfg, log_dir: run_evaluation(data_dir, mcfg, log_dir=log_dir, fixed=fixed), "gowalla", epochs,
              out, **fixed)


@evaluate.command("online-retail")
@click.option("--path", default="../shared/data/online_retail/online_retail.csv.gz", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--epochs", type=int, default=None, help="Override the number of epochs.")
@model_options
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_retail(path, epochs, lin_weights, lin_user_weights, alpha, item_bias, out):
    """Time-ordered split of UCI Online Retail (first 80% of time to train): ours against the baselines."""
    from graph_models.retail import run_evaluation
    cfg = load_config()  # the demo's sizes: what `make run` serves
    fixed = _chosen(lin_weights, lin_user_weights, alpha, item_bias)
    _evaluate(lambda mcfg, log_dir: run_evaluation(path, mcfg, log_dir=log_dir, fixed=fixed), "online-retail", epochs,
              out, dim=cfg.embed_dim, sharp_dim=cfg.sharp_dim, **fixed)


@evaluate.command("cold-items")
@click.option("--path", default="../shared/data/online_retail/online_retail.csv.gz", show_default=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--protocol", type=click.Choice(["both", "time", "heldout"]), default="both", show_default=True,
              help="time: items first sold after training; heldout: a seeded 20% of items hidden.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_cold_items(path, protocol, out):
    """Online Retail's new items (first sold after training) and a seeded 20% of items hidden with all their
    edges: ours as served (the full-score mix, with the learned content map and with content-kNN's
    attention; the learned map's rows alone) against EASE, popularity by category, content-kNN and the
    model without content, all in one run; settings chosen on validation as `train` chooses them."""
    from datetime import datetime, timezone

    from app.embeddings.training import fixed_settings, model_config
    from graph_models import coldeval
    cfg = load_config()
    log_dir = cfg.home / "runs" / f"eval-cold-items-{protocol}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    click.echo(f"TensorBoard logs: {log_dir} (tensorboard --logdir {log_dir.parent})")
    protocols = ("time", "heldout") if protocol == "both" else (protocol,)
    report = coldeval.run_evaluation(path, model_config(cfg), log_dir=str(log_dir), fixed=fixed_settings(cfg),
                                     protocols=protocols)
    click.echo(json.dumps(report, indent=2, default=str))
    click.echo(coldeval.table(report))
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)


@evaluate.command("log")
@event_file_options
@click.option("--test-fraction", type=click.FloatRange(0.05, 0.5), default=0.2, show_default=True,
              help="Each shopper's latest share of interactions held out as the test.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_log(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, test_fraction, out):
    """Any event log, each shopper's latest interactions held out: ours (trained as `train` does, settings
    chosen on validation) against EASE, ItemKNN (both tuned on the same validation), GF-CF and popularity."""
    from app.evaluation import events
    from app.embeddings.training import fixed_settings, model_config
    from graph_models import logeval
    from graph_models.stream import Live
    if fmt == "csv" and not (user_col and item_col and ts_col):
        fail("--format csv needs --user-col, --item-col and --ts-col")
    cfg = load_config()
    try:
        log = events.read(cfg, events.batches(path, fmt, user_col=user_col, item_col=item_col, ts_col=ts_col,
                                              ts_unit=ts_unit, weight_col=weight_col, type_col=type_col), 1.0)
    except ValueError as exc:
        fail(str(exc))
    edges = Live(log.stream, len(log.stream.ts)).edges()
    graph = edges.graph()
    first = logeval.first_matrix(graph, edges.u, edges.i, edges.first)
    mcfg = model_config(cfg)
    try:
        report = logeval.run(graph, first, mcfg, test_fraction, fixed_settings(cfg), cfg.train_minutes * 60)
    except ValueError as exc:
        fail(str(exc))
    _print_report(report, ("ours", "ease", "itemknn", "gfcf", "popularity"), out)


@evaluate.command("stream")
@event_file_options
@click.option("--k", type=click.IntRange(1, 500), default=20, show_default=True)
@click.option("--train-fraction", type=click.FloatRange(0.05, 0.95), default=0.8, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=None, help="Events per micro-batch.")
@click.option("--batch-minutes", type=click.FloatRange(min=0.001), default=None, help="Minutes of time per micro-batch.")
@click.option("--retrain-every", type=click.IntRange(1), default=50, show_default=True,
              help="incremental_retrain: a full retrain every this many batches.")
@click.option("--finetune-every", type=click.IntRange(2), default=10, show_default=True,
              help="streaming: a streaming update every this many batches.")
@click.option("--replay", type=click.FloatRange(0), default=1.0, show_default=True,
              help="streaming: older edges replayed per recent edge (drawn mostly from just before the window).")
@click.option("--finetune-rounds", type=click.IntRange(0), default=2, show_default=True,
              help="streaming: rounds of the response search per update (0: biases only).")
@click.option("--models", default=None, help="Comma-separated subset of the models (all by default).")
@click.option("--engine", type=click.Choice(["memory", "neo4j"]), default="memory", show_default=True,
              help="neo4j: `incremental` runs through ingest, refresh and the served query (empty graph needed).")
@model_options
@click.option("--lin-topk", type=click.IntRange(0), default=0, show_default=True,
              help="If > 0, the linear filter keeps only each item's this many nearest items.")
@click.option("--bias-l2", type=click.FloatRange(0), default=None, help="L2 weight of the item biases' fit at training.")
@click.option("--item-trend", type=click.FloatRange(0), default=None,
              help="With --item-bias: a live trend prior, new adopters decayed with this half-life in days (0: none).")
@click.option("--trend-weight", type=click.FloatRange(0), default=None, help="Weight of the --item-trend prior.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Write results.json/md/png here.")
def evaluate_stream(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, k, train_fraction,
                    batch_size, batch_minutes, retrain_every, finetune_every, replay, finetune_rounds, models, engine,
                    lin_weights, lin_user_weights, lin_topk, alpha, item_bias, bias_l2, item_trend, trend_weight, out):
    """Prequential evaluation on any event log: score each micro-batch's new (user, item) events, then learn it."""
    from app.evaluation import stream as stream_eval
    if fmt == "csv" and not (user_col and item_col and ts_col):
        fail("--format csv needs --user-col, --item-col and --ts-col")
    if batch_size and batch_minutes:
        fail("give --batch-size or --batch-minutes, not both")
    chosen = [m.strip() for m in models.split(",")] if models else None
    unknown = set(chosen or ()) - set(stream_eval.MODELS)
    if unknown:
        fail(f"--models: unknown {', '.join(sorted(unknown))} (known: {', '.join(stream_eval.MODELS)})")
    try:
        result = stream_eval.evaluate(load_config(), path, fmt, dict(
            user_col=user_col, item_col=item_col, ts_col=ts_col, ts_unit=ts_unit, weight_col=weight_col,
            type_col=type_col), k=k, train_fraction=train_fraction, batch_size=batch_size,
            batch_minutes=batch_minutes, retrain_every=retrain_every, finetune_every=finetune_every,
            replay=replay, finetune_rounds=finetune_rounds, models=chosen, engine=engine, lin_weights=lin_weights,
            lin_topk=lin_topk, alpha=alpha, lin_user_weights=lin_user_weights, item_bias=item_bias,
            bias_l2=bias_l2, trend_halflife=item_trend, trend_weight=trend_weight)
    except ValueError as exc:
        fail(str(exc))
    from app.evaluation import report
    click.echo(report.table(result))
    if out:
        click.echo(f"wrote {report.write(result, out)}/results.json, results.md, results.png")


def _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon):
    """The event file as a plain history and the cut (given, else the latest with `horizon` days after it)."""
    import pandas as pd

    from app.evaluation import history
    if fmt == "csv" and not (user_col and item_col and ts_col):
        fail("--format csv needs --user-col, --item-col and --ts-col")
    events = history.read(path, fmt, user_col=user_col, item_col=item_col, ts_col=ts_col, ts_unit=ts_unit,
                          weight_col=weight_col, type_col=type_col)
    return events, pd.Timestamp(cut) if cut else history.default_cut(events, horizon)


def cut_options(f):
    """The cut date and the horizon after it."""
    for option in reversed([
        click.option("--cut", default=None, help="Calibration ends here (YYYY-MM-DD; default: the latest day with "
                                                 "--horizon days of data after it)."),
        click.option("--horizon", type=click.IntRange(1), default=90, show_default=True,
                     help="Days after the cut that make the label."),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON."),
    ]):
        f = option(f)
    return f


@evaluate.command("churn")
@event_file_options
@cut_options
@click.option("--min-days", type=click.IntRange(1), default=2, show_default=True,
              help="Users scored: those with at least this many active days before the cut.")
def evaluate_churn(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon, out,
                   min_days):
    """Churn (no event in the --horizon days after --cut): ours (LightGBM, settings chosen on an earlier
    cut) against recency, frequency, the overdue formula and BG/NBD; ROC AUC and precision at the top 10%."""
    from graph_models import churneval
    events, cut = _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon)
    try:
        report = churneval.run(events, cut, horizon, min_days)
    except ValueError as exc:
        fail(str(exc))
    click.echo(json.dumps(report, indent=2, default=str))
    click.echo(f"\n{'model':<16} {'AUC':>7} {'P@10%':>7}")
    for key in ("ours", *churneval.BASELINES):
        click.echo(f"{key:<16} {report[key]['auc']:>7.4f} {report[key]['precision@10%']:>7.4f}")
    _write(report, out)


@evaluate.command("churn-study")
@event_file_options
@click.option("--early", required=True, help="Validation cuts FIRST:LAST:EVERY_DAYS (YYYY-MM-DD:YYYY-MM-DD:N).")
@click.option("--late", required=True, help="More validation cuts, comma-separated (YYYY-MM-DD,...).")
@click.option("--horizon", type=click.IntRange(1), default=90, show_default=True, help="Days after a cut that make the label.")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the report as JSON.")
def evaluate_churn_study(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, early, late, horizon,
                         out):
    """How the churn model's design was chosen: each variant's AUC and margin over the best baseline at
    validation cuts only (two groups of cuts), trained on the cuts whose labels end by each."""
    import pandas as pd

    from graph_models import churnstudy
    events, _ = _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, None, horizon)
    first, last, every = early.split(":")
    groups = {"early": list(pd.date_range(first, last, freq=f"{int(every)}D")),
              "late": [pd.Timestamp(c) for c in late.split(",")]}
    report = churnstudy.run(events, groups, horizon)
    click.echo(json.dumps(report, indent=2))
    click.echo(f"\n{'variant':<44} " + " ".join(f"{g + ' AUC':>10} {'margin':>7} {'least':>7}" for g in groups))
    for name in churnstudy.VARIANTS:
        click.echo(f"{name:<44} " + " ".join(f"{report[g][name]['auc']:>10.4f} {report[g][name]['margin']:>+7.4f} "
                                             f"{report[g][name]['least_margin']:>+7.4f}" for g in groups if name in report[g]))
    _write(report, out)


@evaluate.command("audience")
@event_file_options
@cut_options
@click.option("--k", type=click.IntRange(1), default=100, show_default=True, help="Audience size for recall.")
def evaluate_audience(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon, out, k):
    """Audience: for each item bought in the --horizon days after --cut, rank every user active before it;
    recall@k and AUC of ours (as the API serves it; the full score over every user; the vector cosine)
    against the most active users and ItemKNN."""
    from app.evaluation.audience import served
    from graph_models import ModelConfig, audienceeval
    events, cut = _history(path, fmt, user_col, item_col, ts_col, ts_unit, weight_col, type_col, cut, horizon)
    cfg = load_config()
    scorers, chosen, model = audienceeval.scorers(events, cut, ModelConfig(dim=cfg.embed_dim, sharp_dim=cfg.sharp_dim),
                                                  budget_s=cfg.train_minutes * 60)
    # what GET /v1/items/<id>/audience answers (IG_AUDIENCE_CANDIDATES candidates), first
    scorers = {"ours_served": served(model, cfg.audience_candidates), **scorers}
    chosen["audience_candidates"] = cfg.audience_candidates
    report = {**audienceeval.run(events, cut, scorers, horizon, k), "chosen": chosen}
    click.echo(json.dumps(report, indent=2, default=str))
    click.echo(f"\n{'model':<14} {'R@' + str(k):>7} {'AUC':>7} {'R@' + str(k) + ' new':>9} {'AUC new':>8}")
    for key in scorers:
        a, n = report[key]["all"], report[key]["new"]
        click.echo(f"{key:<14} {a[f'recall@{k}']:>7.4f} {a['auc']:>7.4f} {n[f'recall@{k}']:>9.4f} {n['auc']:>8.4f}")
    _write(report, out)


def _write(report: dict, out: str | None) -> None:
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)


def _evaluate(run, name: str, epochs: int | None, out: str | None, **sizes) -> None:
    """Run one evaluation with TensorBoard logs under IG_HOME/runs and print its table."""
    from datetime import datetime, timezone

    from graph_models import ModelConfig
    mcfg = ModelConfig(**sizes)
    if epochs is not None:
        mcfg.epochs = epochs
    log_dir = load_config().home / "runs" / f"eval-{name}-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}"
    click.echo(f"TensorBoard logs: {log_dir} (tensorboard --logdir {log_dir.parent})")
    report = run(mcfg, str(log_dir))
    _print_report(report, ("model", "ease", "gfcf", "itemknn", "popularity"), out)


def _print_report(report: dict, keys, out: str | None) -> None:
    """An evaluation's JSON (without per-trial histories), its table, and the JSON file if asked."""
    click.echo(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2, default=str))
    click.echo(f"\n{'model':<12} {'Recall@20':>10} {'NDCG@20':>10}")
    for key in keys:
        if report.get(key, {}).get("recall@20") is not None:
            click.echo(f"{key:<12} {report[key]['recall@20']:>10.4f} {report[key]['ndcg@20']:>10.4f}")
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh, indent=2, default=str)
