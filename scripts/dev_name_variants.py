"""Dev check of the name-variant anchors (initials, other scripts, misspellings) on TOFU's dev authors.

Every TOFU author outside the held-out ones (default 180-189, the forget10 authors no design has looked at)
is its own request. Each name is written in several variant forms, each inside one question; a form should
flag its own request and no other, and the built-in look-alike names (`detectors/data/names.txt`, people no
request is about) should flag nothing. Two generators per family: the leak evaluation's own and an
independent one (a seeded random typo; a second, phonetic Russian transliteration), so a rule is not fit to
one generator. Usage: python scripts/dev_name_variants.py [--held-out 180-189] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import logging
import random

from unlearnd.data.tofu import TOFU_AUTHORS, TofuData
from unlearnd.detectors.anchors import FLAG_SCORE, AnchorIndex, RequestAnchors
from unlearnd.detectors.negatives import swap_names
from unlearnd.evaluation.leaks import cyrillic, initials, two_edits

log = logging.getLogger("dev_name_variants")

# a practical Russian transliteration, by sound rather than letter by letter (digraphs first)
_RUSSIAN = [
    ("sch", "ш"),
    ("sh", "ш"),
    ("ch", "ч"),
    ("kh", "х"),
    ("zh", "ж"),
    ("th", "т"),
    ("ph", "ф"),
    ("ts", "ц"),
    ("ck", "к"),
    ("ee", "и"),
    ("oo", "у"),
    ("ou", "у"),
    ("ya", "я"),
    ("yu", "ю"),
    ("ay", "эй"),
    ("ey", "ей"),
    ("w", "у"),
    ("x", "кс"),
    ("j", "дж"),
    ("q", "к"),
    ("c", "к"),
    ("y", "и"),
    ("h", "х"),
    ("a", "а"),
    ("b", "б"),
    ("d", "д"),
    ("e", "е"),
    ("f", "ф"),
    ("g", "г"),
    ("i", "и"),
    ("k", "к"),
    ("l", "л"),
    ("m", "м"),
    ("n", "н"),
    ("o", "о"),
    ("p", "п"),
    ("r", "р"),
    ("s", "с"),
    ("t", "т"),
    ("u", "у"),
    ("v", "в"),
    ("z", "з"),
]


def russian(name: str) -> str:
    out = []
    for word in name.split():
        low, res, i = word.lower(), "", 0
        while i < len(low):
            for latin, cyr in _RUSSIAN:
                if low.startswith(latin, i):
                    res, i = res + cyr, i + len(latin)
                    break
            else:
                res, i = res + low[i], i + 1
        out.append(res[:1].upper() + res[1:])
    return " ".join(out)


def random_typo(name: str, rng: random.Random) -> str:
    """Two random edits (substitute, insert, delete or swap neighbours) inside one part of 5+ letters,
    keeping its first letter."""
    parts = name.split()
    long = [k for k, p in enumerate(parts) if len(p.replace("-", "")) >= 5] or [
        max(range(len(parts)), key=lambda j: len(parts[j]))
    ]
    k = rng.choice(long)
    p = parts[k]
    for _ in range(2):
        i = rng.randrange(1, len(p))
        op = rng.choice("sids")
        letter = rng.choice("aeioulnrst")
        if op == "s":
            p = p[:i] + letter + p[i + 1 :]
        elif op == "i":
            p = p[:i] + letter + p[i:]
        elif op == "d" and len(p) > 4:
            p = p[:i] + p[i + 1 :]
        elif i + 1 < len(p):
            p = p[:i] + p[i + 1] + p[i] + p[i + 2 :]
    parts[k] = p
    return " ".join(parts)


FAMILIES = {
    "as_written": lambda n, rng: n,
    "initials": lambda n, rng: initials(n),
    "cyrillic_letters": lambda n, rng: cyrillic(n),
    "cyrillic_sound": lambda n, rng: russian(n),
    "two_edits": lambda n, rng: two_edits(n),
    "random_typo": random_typo,
}
# people named in Russian, whom no request is about (common first names and surnames, fixed before any run)
RUSSIAN_PEOPLE = [
    "Иван Петров",
    "Сергей Смирнов",
    "Анна Кузнецова",
    "Дмитрий Соколов",
    "Ольга Иванова",
    "Алексей Попов",
    "Мария Васильева",
    "Николай Новиков",
    "Елена Морозова",
    "Андрей Волков",
    "Татьяна Лебедева",
    "Михаил Козлов",
    "Наталья Павлова",
    "Павел Семёнов",
    "Юлия Егорова",
    "Владимир Орлов",
    "Ирина Фёдорова",
    "Александр Пушкин",
    "Лев Толстой",
    "Фёдор Достоевский",
    "Антон Чехов",
    "Анна Ахматова",
    "Марина Цветаева",
    "Борис Пастернак",
    "Михаил Булгаков",
    "Иосиф Бродский",
    "Николай Гоголь",
    "Максим Горький",
    "Хасан Алиев",
    "Тимур Ахмедов",
    "Джамал Ибрагимов",
    "Сабина Мамедова",
    "Кирилл Ли",
    "Виктор Цой",
    "Роза Хамидова",
    "Эдуард Лимонов",
    "Патрик Свейзи",
    "Эдвард Нортон",
    "Уильям Шекспир",
    "Джейн Остин",
]
TEMPLATE = "What did {} write about, and which awards did they win?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--held-out", default="180-189")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lo, hi = (int(x) for x in args.held_out.split("-"))
    data = TofuData(allow_hub=False)
    names = data.names_of([a for a in range(TOFU_AUTHORS) if not lo <= a <= hi])
    index = AnchorIndex()
    for author, name in names.items():
        index.add(str(author), RequestAnchors(names=[name]))
    rng = random.Random(args.seed)
    out: dict[str, dict] = {}
    for family, make in FAMILIES.items():
        hit = other = 0
        missed, wrong = [], []
        for author, name in names.items():
            form = make(name, rng)
            flagged = {r for r, h in index.find(TEMPLATE.format(form)).items() if h.score >= FLAG_SCORE}
            hit += str(author) in flagged
            other += bool(flagged - {str(author)})
            if str(author) not in flagged:
                missed.append(f"{name} -> {form}")
            if flagged - {str(author)}:
                wrong.append(f"{form} -> {sorted(names[int(r)] for r in flagged - {str(author)})}")
        look = [make(n, rng) for n in swap_names()]
        false = []
        for f in look:
            found = [r for r, h in index.find(TEMPLATE.format(f)).items() if h.score >= FLAG_SCORE]
            if found:
                false.append(f"{f} -> {sorted(names[int(r)] for r in found)}")
        out[family] = {
            "own": f"{hit}/{len(names)}",
            "another_author": f"{other}/{len(names)}",
            "look_alikes_flagged": f"{len(false)}/{len(look)}",
            "missed": missed[:12],
            "wrong": wrong[:8],
            "false": false[:8],
        }
    russian_false = []
    for person in RUSSIAN_PEOPLE:
        found = [r for r, h in index.find(TEMPLATE.format(person)).items() if h.score >= FLAG_SCORE]
        if found:
            russian_false.append(f"{person} -> {sorted(names[int(r)] for r in found)}")
    out["people_named_in_russian"] = {"flagged": f"{len(russian_false)}/{len(RUSSIAN_PEOPLE)}", "false": russian_false}
    print(json.dumps(out, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
