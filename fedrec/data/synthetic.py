"""fedrec's own synthetic interaction generator: the embedded default data set.

Deterministic by seed. Items have Zipf popularity, a primary genre (and sometimes a second
one), a title drawn from genre-specific words and a year. Users belong to attribute groups
(gender × age band) whose genre tastes differ, so fairness audits see real group differences.
Sequences mix long-term taste (genre preference × popularity) with short-term dynamics: with
probability ``sequential_strength`` the next item is one of a few fixed "successors" of the
previous item (sequels, series, follow-ups), which a sequential model can learn and a
popularity ranking cannot.

Generation is vectorised over users step by step, so 10⁵ users take seconds and memory grows
only with the number of interactions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrec.data.dataset import InteractionDataset

GENRES = [
    "Action",
    "Adventure",
    "Animation",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]

_GENRE_WORDS = {
    "Action": "Strike Fury Bullet Chase Impact Vendetta",
    "Adventure": "Quest Voyage Island Expedition Treasure Horizon",
    "Animation": "Bunny Toys Dragonling Pixel Cloud Kingdom",
    "Comedy": "Wedding Roommates Mayhem Vacation Pranks Neighbors",
    "Crime": "Heist Syndicate Alibi Detective Getaway Mob",
    "Documentary": "Planet Ocean Story Truth Journey Lives",
    "Drama": "Silence Letters Promise Family River Winter",
    "Fantasy": "Wizard Sword Realm Prophecy Elves Spell",
    "Horror": "Haunting Curse Ghoul Cellar Nightmare Ritual",
    "Musical": "Melody Stage Rhythm Chorus Ballroom Song",
    "Mystery": "Riddle Cipher Vanishing Clue Manor Secret",
    "Romance": "Kiss Heart Paris Summer Love Sweetheart",
    "Sci-Fi": "Galaxy Android Starship Nebula Cyborg Orbit",
    "Thriller": "Hostage Pursuit Conspiracy Witness Trap Countdown",
    "War": "Battalion Trenches Frontline Siege Sniper Victory",
    "Western": "Outlaw Saloon Frontier Sheriff Canyon Gunslinger",
}
_ADJECTIVES = [
    "Last",
    "Silent",
    "Red",
    "Lost",
    "Hidden",
    "Broken",
    "Golden",
    "Dark",
    "Wild",
    "Final",
    "Secret",
    "Endless",
    "Burning",
    "Crimson",
    "Frozen",
    "Distant",
    "Little",
    "Midnight",
    "Savage",
    "Electric",
]

GENDERS = ("F", "M")
AGE_BANDS = ("18-24", "25-34", "35-49", "50+")
_AGE_PROBS = (0.25, 0.35, 0.25, 0.15)


@dataclass
class SyntheticConfig:
    """The generator's options. ``catalogue``: a RecBole data set folder (``<folder>/<folder
    name>.item`` with titles and genres, and its ``.inter``) whose real items replace the
    generated ones — titles, genres, years, popularity from its interaction counts — under
    synthetic users with the same group tastes; ``num_items``, ``num_genres`` and
    ``zipf_exponent`` then do not apply. Its interactions are read for the counts only."""

    num_users: int = 2000
    num_items: int = 1000
    num_genres: int = 12
    zipf_exponent: float = 1.0
    mean_length: float = 40.0
    min_length: int = 5
    max_length: int = 200
    successors_per_item: int = 3
    sequential_strength: float = 0.6
    taste_concentration: float = 5.0
    seed: int = 0
    catalogue: str = ""

    def __post_init__(self) -> None:
        if self.num_users < 1 or self.num_items < 2:
            raise ValueError("synthetic: num_users must be >= 1 and num_items >= 2")
        if not 1 <= self.num_genres <= len(GENRES):
            raise ValueError(
                f"synthetic.num_genres must be in 1..{len(GENRES)}, got {self.num_genres}"
            )
        if not 1 <= self.min_length <= self.max_length:
            raise ValueError("synthetic: need 1 <= min_length <= max_length")
        if not self.min_length <= self.mean_length <= self.max_length:
            raise ValueError("synthetic.mean_length must lie between min_length and max_length")
        if not 0.0 <= self.sequential_strength <= 1.0:
            raise ValueError("synthetic.sequential_strength must be in [0, 1]")
        if self.zipf_exponent < 0 or self.taste_concentration <= 0 or self.successors_per_item < 1:
            raise ValueError(
                "synthetic: zipf_exponent >= 0, taste_concentration > 0, successors_per_item >= 1"
            )


def _sample_rows(cumulative: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """Row-wise inverse-CDF sampling: one category per row of a cumulative matrix."""
    return np.minimum((cumulative < uniforms[:, None]).sum(axis=1), cumulative.shape[1] - 1)


@dataclass
class _Items:
    popularity: np.ndarray  # [items], relative
    primary: np.ndarray  # [items], index into ``genres``
    genres: list[str]
    genre_prior: np.ndarray  # [genres], multiplies every user's taste
    raw_ids: np.ndarray
    features: dict[str, np.ndarray]


def _generated_items(config: SyntheticConfig, rng: np.random.Generator) -> _Items:
    n_items, n_genres = config.num_items, config.num_genres
    genres = GENRES[:n_genres]
    popularity = rng.permutation(
        np.arange(1, n_items + 1, dtype=np.float64) ** -config.zipf_exponent
    )
    primary = rng.integers(n_genres, size=n_items)
    secondary = np.where(rng.random(n_items) < 0.4, rng.integers(n_genres, size=n_items), primary)
    words = {g: _GENRE_WORDS[g].split() for g in genres}
    titles = []
    seen: dict[str, int] = {}
    for item in range(n_items):
        genre = genres[primary[item]]
        title = f"{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]} {words[genre][rng.integers(len(words[genre]))]}"
        seen[title] = seen.get(title, 0) + 1
        titles.append(title if seen[title] == 1 else f"{title} {seen[title]}")
    genre_text = [
        genres[p] if p == s else f"{genres[p]} {genres[s]}"
        for p, s in zip(primary, secondary, strict=True)
    ]
    years = rng.integers(1950, 2021, size=n_items).astype(str)
    return _Items(
        popularity,
        primary,
        genres,
        np.ones(n_genres),
        np.array([f"i{i}" for i in range(n_items)], dtype=object),
        {
            "title": np.array(titles, dtype=object),
            "genres": np.array(genre_text, dtype=object),
            "year": years.astype(object),
        },
    )


def _catalogue_items(catalogue: InteractionDataset) -> _Items:
    """A real catalogue's items: their features as they are, popularity from the catalogue's
    own interaction counts (+1, so that no item is unreachable), and as an item's primary genre
    (what group tastes act on) its most specific listed one (fewest items: Film-Noir before
    Drama). Real genres differ in size by 100×, so every taste is also weighted by its genre's
    share of the catalogue's popularity: groups tilt the real genre mix, as the generated
    catalogue's equal-sized genres need no weighting."""
    listed = catalogue.item_features.get("genres")
    if listed is None:
        raise ValueError(
            f"synthetic.catalogue: {catalogue.name} has no item genres (a genres/class column "
            "in its .item file): group tastes need them"
        )
    of_item = [str(g).split() or ["unknown"] for g in listed]
    sizes: dict[str, int] = {}
    for names in of_item:
        for name in names:
            sizes[name] = sizes.get(name, 0) + 1
    genres = sorted(sizes)
    index = {g: i for i, g in enumerate(genres)}
    primary = np.array([index[min(names, key=lambda g: (sizes[g], g))] for names in of_item])
    popularity = np.bincount(catalogue.item_ids, minlength=catalogue.num_items) + 1.0
    mass = np.bincount(primary, weights=popularity, minlength=len(genres))
    return _Items(
        popularity,
        primary,
        genres,
        mass / mass.sum(),
        catalogue.raw_item_ids,
        dict(catalogue.item_features),
    )


def generate_synthetic(
    config: SyntheticConfig, catalogue: InteractionDataset | None = None
) -> InteractionDataset:
    """Synthetic users and sequences; over ``catalogue``'s items (its titles, genres, years and
    popularity) when given, else over generated items (``num_items``, ``num_genres``)."""
    rng = np.random.default_rng(config.seed)
    items_of = _generated_items(config, rng) if catalogue is None else _catalogue_items(catalogue)
    n_users, n_items = config.num_users, len(items_of.popularity)
    n_genres = len(items_of.genres)
    popularity, primary = items_of.popularity, items_of.primary

    # Successors: a few popular-weighted items of the same genre, fixed per item.
    items_of_genre = [np.flatnonzero(primary == g) for g in range(n_genres)]
    genre_cdf = []
    successors = np.empty((n_items, config.successors_per_item), dtype=np.int64)
    for members in items_of_genre:
        if len(members) == 0:
            genre_cdf.append(np.zeros(0))
            continue
        weights = popularity[members] / popularity[members].sum()
        genre_cdf.append(np.cumsum(weights))
        successors[members] = rng.choice(
            members, size=(len(members), config.successors_per_item), p=weights
        )
        # No item is its own successor (a repeat would be removed by de-duplication).
        own = successors[members] == members[:, None]
        shifted = members[(np.searchsorted(members, members) + 1) % len(members)]
        successors[members] = np.where(own, shifted[:, None], successors[members])
    genre_weight = np.array([popularity[m].sum() if len(m) else 0.0 for m in items_of_genre])

    # Users: attribute groups with different genre tastes.
    gender = rng.integers(len(GENDERS), size=n_users)
    age = rng.choice(len(AGE_BANDS), size=n_users, p=_AGE_PROBS)
    group = gender * len(AGE_BANDS) + age
    group_taste = rng.dirichlet(np.full(n_genres, 0.5), size=len(GENDERS) * len(AGE_BANDS))
    user_taste = rng.gamma(config.taste_concentration * group_taste[group] + 1e-3)
    user_taste *= (genre_weight > 0) * items_of.genre_prior
    taste_cdf = np.cumsum(user_taste / user_taste.sum(axis=1, keepdims=True), axis=1)

    extra = (
        rng.geometric(1.0 / max(1.0, config.mean_length - config.min_length + 1), size=n_users) - 1
    )
    lengths = np.minimum(config.min_length + extra, config.max_length)

    # Sequences, one step for all active users at a time.
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.empty(offsets[-1], dtype=np.int64)
    previous = np.zeros(n_users, dtype=np.int64)
    for step in range(int(lengths.max())):
        active = np.flatnonzero(lengths > step)
        follow = rng.random(len(active)) < (config.sequential_strength if step else 0.0)
        chosen = np.empty(len(active), dtype=np.int64)
        chosen[follow] = successors[
            previous[active[follow]], rng.integers(config.successors_per_item, size=follow.sum())
        ]
        fresh = active[~follow]
        picked_genre = _sample_rows(taste_cdf[fresh], rng.random(len(fresh)))
        fresh_items = np.empty(len(fresh), dtype=np.int64)
        for g in np.unique(picked_genre):
            rows = picked_genre == g
            position = np.searchsorted(genre_cdf[g], rng.random(rows.sum()) * genre_cdf[g][-1])
            fresh_items[rows] = items_of_genre[g][np.minimum(position, len(items_of_genre[g]) - 1)]
        chosen[~follow] = fresh_items
        items[offsets[active] + step] = chosen
        previous[active] = chosen

    # Timestamps: sessions of minutes-apart events separated by gaps of days.
    start = rng.integers(946_684_800, 978_307_200, size=n_users)  # during the year 2000
    gaps = np.where(
        rng.random(len(items)) < 0.7,
        rng.exponential(600, len(items)),
        rng.exponential(3 * 86_400, len(items)),
    )
    gaps = gaps.astype(np.int64) + 1
    gaps[offsets[:-1]] = 0
    user_of = np.repeat(np.arange(n_users), lengths)
    timestamps = start[user_of] + (
        np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[offsets[:-1]], lengths)
    )

    return InteractionDataset(
        name="synthetic" if catalogue is None else f"synthetic-{catalogue.name}",
        user_ids=user_of.astype(np.int64),
        item_ids=items,
        timestamps=timestamps.astype(np.float64),
        ratings=None,
        raw_user_ids=np.array([f"u{u}" for u in range(n_users)], dtype=object),
        raw_item_ids=items_of.raw_ids,
        item_features=items_of.features,
        user_features={
            "gender": np.array(GENDERS, dtype=object)[gender],
            "age": np.array(AGE_BANDS, dtype=object)[age],
        },
    )
