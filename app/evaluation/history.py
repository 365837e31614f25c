"""An event file as a plain history (user, item, ts, value) for the churn and audience evaluations."""
from __future__ import annotations

import pandas as pd


def read(path, fmt: str, user_col=None, item_col=None, ts_col=None, ts_unit="s", weight_col=None,
         type_col=None) -> pd.DataFrame:
    """Online Retail's clean purchase lines (value: unit price), or any CSV's rows (value: the weight
    column, else 1; rows whose type is `return` dropped), sorted by time."""
    if fmt == "online-retail":
        from graph_models.retail import read_purchases
        r = read_purchases(path)
        return pd.DataFrame({"user": r["customer"], "item": r["item"], "ts": r["ts"], "value": r["price"]})
    cols = [c for c in (user_col, item_col, ts_col, weight_col, type_col) if c]
    df = pd.read_csv(path, usecols=cols)
    if type_col:
        df = df[df[type_col].astype(str).str.strip() != "return"]
    ts = df[ts_col]
    ts = (pd.to_datetime(ts, unit=ts_unit) if pd.api.types.is_numeric_dtype(ts)
          else pd.to_datetime(ts, utc=True, format="ISO8601").dt.tz_localize(None))
    out = pd.DataFrame({"user": df[user_col].astype(str).to_numpy(), "item": df[item_col].astype(str).to_numpy(),
                        "ts": ts.to_numpy(),
                        "value": df[weight_col].astype(float).to_numpy() if weight_col else 1.0})
    if out.empty:
        raise ValueError("no event in the file")
    return out.sort_values("ts", kind="stable", ignore_index=True)


def default_cut(events: pd.DataFrame, horizon_days: int) -> pd.Timestamp:
    """The latest day whose `horizon_days` after it are all in the file."""
    return (events["ts"].max() - pd.Timedelta(days=horizon_days)).floor("D")
