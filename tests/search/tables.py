"""Reading back the tables a search writes (trials.csv, front.csv, confirm.csv) in tests."""
from __future__ import annotations

import pandas as pd


def read_table(path) -> pd.DataFrame:
    """The table with its Ray trial ids as text. pandas infers a column's type from its values, so an id such as
    '996687e0' came back as the float 996687.0 (and one of eight digits would be an int): a test comparing ids failed
    about once in a few dozen runs."""
    return pd.read_csv(path, dtype={"trial_id": str})
