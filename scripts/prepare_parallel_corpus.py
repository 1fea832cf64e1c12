#!/usr/bin/env python
"""Build a real English-German parallel corpus offline, from the gettext catalogues that Debian packages ship.

Each package in a fixed list (`PACKAGES`, or `--packages_file`) is fetched with `apt-get download` into
`--cache_dir` and unpacked with `dpkg-deb -x` (never installed). Its German message catalogues,
`usr/share/locale/de/LC_MESSAGES/*.mo`, are read with Python's `gettext.GNUTranslations`: every (msgid, msgstr)
pair is an (English, German) translation. The header entry, untranslated and empty entries and entries whose
translation equals the English are dropped; a plural entry contributes its singular pair (English msgid, the German
form for n=1); a message context (msgctxt) is dropped from the key; strings are kept verbatim, format placeholders
(`%s`, `%1$s`, `{name}`) included. A catalogue that cannot be read is skipped with a warning naming it.

Splits are by package: a fixed, seeded draw assigns whole packages to test and validation, so their strings come
from packages never seen in training; pairs are deduplicated, and validation/test drop English strings that training
(or, for test, validation) already holds. The output, in the JSON-lines format of transformers' run_translation
(`{"translation": {"en": ..., "de": ...}}`), is train.json, validation.json, test.json and info.json (source,
packages per split, counts), written into a temporary folder renamed at the end, so an interrupted build leaves
nothing that looks complete.

With `--dataset_name wmt14 --dataset_config de-en` the corpus comes from the Hub instead, when it is reachable.

    python scripts/prepare_parallel_corpus.py --output_dir data/parallel/debian-en-de
"""

import gettext
import json
import logging
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm
from transformers import HfArgumentParser

logger = logging.getLogger("prepare_parallel_corpus")

# Debian 12 packages with a German catalogue, small downloads (0.1 to 5 MB) and at least 50 translated strings each.
PACKAGES = """
    a2ps adduser apt aptitude-common aspell bash bison coreutils cpio cryptsetup-bin diffutils dpkg elinks-data
    evince-common findutils fish-common flex fwupd gawk gcc-12-locales gcr gdm3 geany-common gedit-common gettext
    gnome-terminal-data gnucash-common gnupg-l10n grep grub-common gsettings-desktop-schemas gvfs-common iso-codes kbd
    libc-l10n libgdk-pixbuf2.0-common libglib2.0-data libgnutls30 libgpg-error-l10n libgtk-3-common libgtk-4-common
    libgtk2.0-common libgweather-4-common libhandy-1-0 libpam-runtime libxfce4ui-common login lynx-common make man-db
    mc-data mousepad mutt nano nautilus-data network-manager packagekit procps psmisc quota sed seahorse
    shared-mime-info sharutils slrn subversion sudo synaptic sysstat tar texinfo thunar-data tin udisks2
    util-linux-locales w3m wdiff wget xfce4-session xfsprogs xz-utils
""".split()
SPLITS = ("train", "validation", "test")


@dataclass
class Arguments:
    output_dir: str = field(default="data/parallel/debian-en-de", metadata={"help": "Where the corpus goes."})
    cache_dir: str = field(
        default="data/parallel/debian-cache", metadata={"help": "Downloaded .deb files and their unpacked trees."}
    )
    packages_file: str | None = field(
        default=None, metadata={"help": "A file naming the packages to use (whitespace-separated; # comments)."}
    )
    extracted_dir: str | None = field(
        default=None,
        metadata={"help": "Already unpacked package trees, one folder per package name: no apt-get is run."},
    )
    validation_packages: float = field(default=6, metadata={"help": "Packages held out for validation (or fraction)."})
    test_packages: float = field(default=8, metadata={"help": "Packages held out for test (a count, or a fraction)."})
    seed: int = field(default=0, metadata={"help": "Seed of the draw that assigns packages to splits."})
    source_lang: str = field(default="en", metadata={"help": "Language code of the msgids."})
    target_lang: str = field(default="de", metadata={"help": "The catalogues' language (usr/share/locale/LANG)."})
    dataset_name: str | None = field(default=None, metadata={"help": "A Hub dataset (wmt14) used if reachable."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration (de-en)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a corpus already in --output_dir."})


def read_packages(path: str | None) -> list[str]:
    if path is None:
        return sorted(PACKAGES)
    if not Path(path).is_file():
        sys.exit(f"error: --packages_file {path} does not exist; omit it to use the built-in list of packages")
    text = Path(path).read_text(encoding="utf-8")
    names = sorted({word for line in text.splitlines() for word in line.split("#")[0].split()})
    if not names:
        sys.exit(f"error: --packages_file {path} names no packages; list Debian package names, one or more a line")
    return names


def how_many(value: float, total: int) -> int:
    return round(value * total) if 0 < value < 1 else int(value)


def assign_splits(packages: list[str], args: Arguments) -> dict[str, list[str]]:
    """A fixed, seeded draw of whole packages for test and validation; the rest is training."""
    order = sorted(packages)
    random.Random(args.seed).shuffle(order)
    n_test, n_validation = how_many(args.test_packages, len(order)), how_many(args.validation_packages, len(order))
    if n_test < 1 or n_validation < 1 or n_test + n_validation >= len(order):
        sys.exit(f"error: {len(order)} packages cannot give {n_test} to test, {n_validation} to validation and some "
                 "to training; change --test_packages/--validation_packages or list more packages")  # fmt: skip
    test, validation = order[:n_test], order[n_test : n_test + n_validation]
    return {"train": sorted(order[n_test + n_validation :]), "validation": sorted(validation), "test": sorted(test)}


def unpacked_tree(package: str, args: Arguments) -> Path | None:
    """The package's unpacked tree: from --extracted_dir, or apt-get download + dpkg-deb -x into --cache_dir."""
    if args.extracted_dir:
        tree = Path(args.extracted_dir) / package
        if not tree.is_dir():
            logger.warning(f"skipping package {package}: {tree} does not exist")
            return None
        return tree
    debs, tree = Path(args.cache_dir) / "debs", Path(args.cache_dir) / "trees" / package
    if tree.is_dir():
        return tree
    debs.mkdir(parents=True, exist_ok=True)
    if not list(debs.glob(f"{package}_*.deb")):
        result = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True)
        if result.returncode != 0:
            logger.warning(f"skipping package {package}: `apt-get download {package}` failed: {result.stderr.strip()}")
            return None
    partial = tree.with_name(tree.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    deb = sorted(debs.glob(f"{package}_*.deb"))[-1]
    result = subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], capture_output=True, text=True)
    if result.returncode != 0:
        logger.warning(f"skipping package {package}: {deb} does not unpack (delete it to download it again): "
                       f"{result.stderr.strip()}")  # fmt: skip
        return None
    partial.rename(tree)
    return tree


def catalogue_pairs(path: Path) -> Iterator[tuple[str, str]]:
    """(msgid, msgstr) pairs of one .mo catalogue, read with gettext; plural entries give their singular pair."""
    with open(path, "rb") as file:
        catalogue = gettext.GNUTranslations(file)
    singular = catalogue.plural(1)  # the index of the form used for n=1 (0 in German)
    for key, translation in catalogue._catalog.items():  # gettext exposes no public iteration over entries
        if isinstance(key, tuple):
            key, form = key
            if form != singular:
                continue
        source = key.split("\x04")[-1]  # msgctxt\x04msgid
        if source.strip() and translation.strip() and source != translation:  # header, empty, untranslated
            yield source, translation


def package_pairs(tree: Path, lang: str) -> list[tuple[str, str]]:
    pairs = []
    for path in sorted(tree.glob(f"usr/share/locale/{lang}/LC_MESSAGES/*.mo")):
        try:
            pairs.extend(catalogue_pairs(path))
        except Exception as error:  # a corrupt or mis-encoded catalogue: skip it, keep the others
            logger.warning(f"skipping unreadable catalogue {path}: {type(error).__name__}: {error}")
    return pairs


def split_rows(by_package: dict[str, list[tuple[str, str]]], splits: dict[str, list[str]]) -> tuple[dict, dict]:
    """Deduplicated pairs per split; validation and test lose English strings already in training (test: also in
    validation). Returns the rows and how many were dropped as overlaps."""
    rows, seen_sources, overlaps = {}, set(), {}
    for split in SPLITS:
        kept, sources, dropped = {}, set(), 0
        for package in splits[split]:
            for source, target in by_package.get(package, []):
                if split != "train" and (source in seen_sources or source in sources):
                    dropped += source in seen_sources
                    continue
                kept.setdefault((source, target), None)
                sources.add(source)
        rows[split], overlaps[split] = list(kept), dropped
        seen_sources |= sources
    return rows, overlaps


def hub_rows(args: Arguments) -> dict[str, list[tuple[str, str]]] | None:
    """The Hub dataset's splits, or None when it cannot be read (no network)."""
    try:
        from datasets import load_dataset

        raw = load_dataset(args.dataset_name, args.dataset_config)
    except Exception as error:
        logger.warning(f"{args.dataset_name} ({args.dataset_config}) is not reachable ({type(error).__name__}); "
                       "using the Debian catalogues instead")  # fmt: skip
        return None
    return {split: [(r["translation"][args.source_lang], r["translation"][args.target_lang]) for r in raw[split]]
            for split in SPLITS if split in raw}  # fmt: skip


def check_output(output: Path, overwrite: bool) -> None:
    if (output / "info.json").exists() and not overwrite:
        sys.exit(f"error: {output} already holds a complete corpus; pass --overwrite to rebuild it, or another "
                 "--output_dir")  # fmt: skip


def write_corpus(output: Path, rows: dict, info: dict, overwrite: bool) -> None:
    """Everything goes into OUTPUT.partial, renamed to OUTPUT once complete."""
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    src, tgt = info["source_lang"], info["target_lang"]
    try:
        for split, pairs in rows.items():
            with open(partial / f"{split}.json", "w", encoding="utf-8") as file:
                for source, target in pairs:
                    file.write(json.dumps({"translation": {src: source, tgt: target}}, ensure_ascii=False) + "\n")
        (partial / "info.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    except BaseException:  # interrupted: leave nothing behind (a killed build leaves only OUTPUT.partial)
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if output.exists():
        check_output(output, overwrite)  # nobody completed it meanwhile
        shutil.rmtree(output)
    partial.rename(output)


def main(argv=None):
    (args,) = HfArgumentParser(Arguments).parse_args_into_dataclasses(argv)
    logging.basicConfig(format="%(levelname)s: %(message)s", level=logging.INFO)
    output, start = Path(args.output_dir), time.time()
    check_output(output, args.overwrite)

    # Data: the Hub's dataset if asked for and reachable, otherwise the Debian catalogues.
    rows = hub_rows(args) if args.dataset_name else None
    info = {"source": f"Hub dataset {args.dataset_name} ({args.dataset_config})", "source_lang": args.source_lang,
            "target_lang": args.target_lang}  # fmt: skip
    if rows is None:
        packages = read_packages(args.packages_file)
        splits = assign_splits(packages, args)
        by_package, missing = {}, []
        for package in tqdm(packages, desc="packages", unit=" pkg"):
            tree = unpacked_tree(package, args)
            if tree is None:
                missing.append(package)
                continue
            by_package[package] = package_pairs(tree, args.target_lang)
            if not by_package[package]:
                logger.warning(f"package {package} has no readable {args.target_lang} catalogue with translations")
        rows, overlaps = split_rows(by_package, splits)
        info.update(source=f"Debian 12 gettext catalogues (usr/share/locale/{args.target_lang}/LC_MESSAGES/*.mo)",
                    seed=args.seed, packages=splits, missing_packages=missing,
                    pairs_per_package={p: len(pairs) for p, pairs in sorted(by_package.items())},
                    dropped_as_seen_in_earlier_split=overlaps)  # fmt: skip
    if not all(rows.get(split) for split in SPLITS):
        sys.exit(f"error: a split came out empty ({ {s: len(rows.get(s, [])) for s in SPLITS} }); list more "
                 "packages (--packages_file) or change --test_packages/--validation_packages")  # fmt: skip

    # Save
    info.update(counts={split: len(rows[split]) for split in SPLITS}, build_seconds=round(time.time() - start, 1))
    write_corpus(output, rows, info, args.overwrite)
    print(f"Source: {info['source']}")
    for split in SPLITS:
        print(f"{output / (split + '.json')}: {len(rows[split])} pairs")


if __name__ == "__main__":
    main()
