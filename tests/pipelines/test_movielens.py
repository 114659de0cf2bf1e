from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipelines import prepare
from pipelines.movielens import AGE_BUCKETS, load_movielens

SHARED_ML100K = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "movielens-100k"

GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
          "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]
# user, item, rating, timestamp
RATINGS = [(1, 1, 5, 100), (1, 2, 3, 101), (2, 1, 4, 102), (2, 3, 1, 103), (3, 2, 2, 104), (3, 3, 5, 105)]


def _flags(*names: str) -> str:
    return "|".join("1" if g in names else "0" for g in GENRES)


def write_100k(folder: Path) -> Path:
    """A tiny MovieLens 100K in the official layout (same separators, Latin-1 titles)."""
    folder.mkdir(parents=True)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in RATINGS))
    (folder / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n3|17|M|writer|T8H1N\n")
    items = [
        f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy|{_flags('Animation', 'Comedy')}\n",
        f"2|Café Society (1995)|01-Jan-1996||http://us.imdb.com/x|{_flags('Drama')}\n",
        f"3|unknown||||{_flags('unknown')}\n",  # the real file has one item without a release date
    ]
    (folder / "u.item").write_bytes("".join(items).encode("latin-1"))
    (folder / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(GENRES)) + "\n")
    return folder


def write_1m(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in RATINGS))
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117\n")
    movies = "1::Toy Story (1995)::Animation|Children's|Comedy\n2::Ça: Thriller (1994)::Drama\n3::Untitled::Horror\n"
    (folder / "movies.dat").write_bytes(movies.encode("latin-1"))
    return folder


def write_latest_small(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rows = "".join(f"{u},{i},{r - 0.5},{t}\n" for u, i, r, t in RATINGS)
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp\n" + rows)
    (folder / "movies.csv").write_text(
        'movieId,title,genres\n1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "2,Babylon 5 (1994) ,Sci-Fi\n3,Some Film,(no genres listed)\n",
        encoding="utf-8",
    )
    return folder


def zip_folder(folder: Path, archive: Path) -> Path:
    """Zip like the official archives: one top folder named after the release."""
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(folder.name + "/", "")
        for f in sorted(folder.iterdir()):
            z.write(f, f"{folder.name}/{f.name}")
    return archive


@pytest.fixture
def ml100k(tmp_path) -> Path:
    return write_100k(tmp_path / "ml-100k")


def test_load_movielens_100k_features_label_time(ml100k):
    raw = load_movielens(ml100k)
    assert raw.name == "movielens-100k"
    assert [f.name for f in raw.features] == [
        "user_id", "item_id", "age", "gender", "occupation", "zip", "genres", "release_year"
    ]
    assert [f.name for f in raw.features if f.multi] == ["genres"]
    assert raw.label.dtype == np.float32
    assert raw.label.tolist() == [1, 0, 1, 0, 0, 1]  # rating >= 4
    assert raw.time.dtype == np.int64 and raw.time.tolist() == [100, 101, 102, 103, 104, 105]
    assert raw.frame["genres"].tolist() == ["Animation|Comedy", "Drama", "Animation|Comedy", "unknown", "Drama", "unknown"]
    assert raw.frame["release_year"].tolist()[:2] == [1995, 1996]
    assert raw.frame["release_year"].isna().tolist() == [False, False, False, True, False, True]
    assert raw.frame["zip"].tolist()[-1] == "T8H1N"
    assert raw.frame["occupation"].tolist()[:2] == ["technician", "technician"]
    assert raw.meta["source"] == str(ml100k.resolve()) and raw.meta["variant"] == "100k"


def test_load_movielens_reads_latin1_titles(ml100k):
    # the Latin-1 "é" must not break decoding, and the year still comes from the release date
    raw = load_movielens(ml100k)
    assert raw.frame.loc[1, "release_year"] == 1996


def test_load_movielens_threshold_moves_the_cut(ml100k):
    assert load_movielens(ml100k, threshold=3).label.tolist() == [1, 1, 1, 0, 0, 1]
    assert load_movielens(ml100k, threshold=5).label.tolist() == [1, 0, 0, 0, 0, 1]


def test_load_movielens_threshold_above_all_ratings_is_refused(ml100k):
    with pytest.raises(ValueError, match="constant"):
        load_movielens(ml100k, threshold=6)


def test_load_movielens_bucket_age_sets_buckets(ml100k):
    assert load_movielens(ml100k).feature("age").buckets is None
    raw = load_movielens(ml100k, bucket_age=True)
    assert raw.feature("age").buckets == AGE_BUCKETS
    data = prepare(raw, fractions=(0.5, 0.5, 0.0))
    cats = set(data.encoder.vocabs["age"].categories)
    assert cats <= {"<18", "[18, 25)", "[50, 56)"} and cats  # ages 24, 53, 17 -> three buckets


def test_load_movielens_zip_with_top_folder_equals_folder(ml100k, tmp_path):
    archive = zip_folder(ml100k, tmp_path / "ml-100k.zip")
    a, b = load_movielens(ml100k), load_movielens(archive)
    assert a.frame.equals(b.frame)
    assert np.array_equal(a.label, b.label) and np.array_equal(a.time, b.time)
    assert b.meta["source"] == str(archive.resolve())


def test_load_movielens_finds_layout_one_folder_down(ml100k):
    assert len(load_movielens(ml100k.parent)) == len(RATINGS)


def test_load_movielens_without_u_genre_uses_official_names(ml100k):
    (ml100k / "u.genre").unlink()
    assert load_movielens(ml100k).frame["genres"].iloc[0] == "Animation|Comedy"


def test_load_movielens_1m_layout(tmp_path):
    raw = load_movielens(zip_folder(write_1m(tmp_path / "ml-1m"), tmp_path / "ml-1m.zip"))
    assert raw.name == "movielens-1m"
    assert [f.name for f in raw.features] == [
        "user_id", "item_id", "age", "gender", "occupation", "zip", "genres", "release_year"
    ]
    assert raw.frame["genres"].iloc[0] == "Animation|Children's|Comedy"
    assert raw.frame["release_year"].tolist()[:2] == [1995, 1994]  # "Ça: Thriller (1994)": Latin-1, a colon
    assert raw.frame["release_year"].isna().sum() == 2  # "Untitled" has no year, rated twice
    assert raw.frame["gender"].tolist()[:3] == ["F", "F", "M"]
    assert raw.frame["age"].tolist()[:3] == [1, 1, 56]
    assert raw.label.tolist() == [1, 0, 1, 0, 0, 1]
    assert raw.time.tolist() == [100, 101, 102, 103, 104, 105]


def test_load_movielens_latest_small_layout(tmp_path):
    raw = load_movielens(write_latest_small(tmp_path / "ml-latest-small"))
    assert raw.name == "movielens-latest-small"
    assert [f.name for f in raw.features] == ["user_id", "item_id", "genres", "release_year"]
    assert raw.frame["genres"].iloc[0] == "Comedy|Drama|Romance"
    assert raw.frame["genres"].isna().tolist() == [False, False, False, True, False, True]  # "(no genres listed)"
    assert raw.frame["release_year"].tolist()[:2] == [1995, 1994]  # trailing space after "(1994)"
    assert raw.label.tolist() == [1, 0, 0, 0, 0, 1]  # ratings 4.5, 2.5, 3.5, 0.5, 1.5, 4.5 against 4


def test_load_movielens_unknown_layout_names_path_and_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"no MovieLens layout in '.*'.*u\.data, u\.user, u\.item.*ratings\.dat"):
        load_movielens(tmp_path)


def test_load_movielens_partial_layout_says_what_was_found(ml100k):
    (ml100k / "u.item").unlink()
    with pytest.raises(ValueError, match=r"found only u\.data, u\.user"):
        load_movielens(ml100k)


def test_load_movielens_zip_without_layout_is_refused(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/readme.txt", "nothing here")
    with pytest.raises(ValueError, match=str(archive)):
        load_movielens(archive)


def test_load_movielens_missing_path_and_non_zip_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_movielens(tmp_path / "nope")
    bogus = tmp_path / "ratings.bin"
    bogus.write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="neither a folder nor a .zip"):
        load_movielens(bogus)


def test_load_movielens_prepare_end_to_end(ml100k):
    data = prepare(load_movielens(ml100k), fractions=(0.5, 0.5, 0.0))
    genres = next(f for f in data.features if f.name == "genres")
    assert genres.multi and genres.cardinality >= 2
    assert data.train.columns["genres"].offsets is not None


@pytest.mark.skipif(not SHARED_ML100K.exists(), reason="shared MovieLens 100K not present")
def test_load_movielens_shared_100k():
    for source in (SHARED_ML100K / "ml-100k", SHARED_ML100K / "ml-100k.zip"):
        raw = load_movielens(source)
        assert len(raw) == 100_000
        assert raw.frame["user_id"].nunique() == 943 and raw.frame["item_id"].nunique() == 1682
        assert raw.frame["genres"].notna().all()
        assert raw.frame["release_year"].isna().sum() == 9  # one movie without a release date
        assert 0.5 < raw.label.mean() < 0.6  # 55,375 ratings of 4 or 5
    data = prepare(raw)
    assert {f.name: f.cardinality for f in data.features}["gender"] == 3

