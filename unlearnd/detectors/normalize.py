"""What a prompt says once the disguise is off: the forms the detector matches names in.

A name can reach the model hidden in many ways that a reader (or the model) still understands:
other Unicode forms (NFKC: full-width letters, ligatures), invisible characters (zero-width,
bidi controls, soft hyphens), look-alike letters from other scripts and other scripts altogether
(transliterated to ASCII: Cyrillic "Накамура" -> "Nakamura"), accents, case, leetspeak
("N4k4mur4"), letter spacing ("N a k a m u r a", "N.a.k.a.m.u.r.a"), reversal and ROT13, and
base64. `views` turns a prompt into the texts a name is looked for in; `compact_forms` into
letters-only strings (spacing, punctuation and leetspeak gone) that a whole name is searched in as
a substring, forwards, backwards and in ROT13.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata

from anyascii import anyascii

# zero-width characters, bidi controls, soft hyphen, word joiner, BOM, Mongolian vowel separator,
# combining grapheme joiner, Hangul fillers: invisible in rendered text, used to split a name
_INVISIBLE = dict.fromkeys(
    [
        0x00AD,
        0x034F,
        0x061C,
        0x115F,
        0x1160,
        0x180E,
        0x200B,
        0x200C,
        0x200D,
        0x200E,
        0x200F,
        0x2060,
        0x2061,
        0x2062,
        0x2063,
        0x2064,
        0x3164,
        0xFEFF,
        0xFFA0,
        *range(0x202A, 0x202F),
        *range(0x2066, 0x206A),
    ]
)

_LEET = str.maketrans(
    {
        "0": "o",
        "1": "i",
        "3": "e",
        "4": "a",
        "5": "s",
        "7": "t",
        "8": "b",
        "9": "g",
        "@": "a",
        "$": "s",
        "!": "i",
        "|": "l",
        "+": "t",
        "€": "e",
        "£": "l",
    }
)
_MIXED = re.compile(r"\S*[A-Za-z]\S*")  # a word with letters in it (leetspeak maps only those)
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=_-])[A-Za-z0-9+/_-]{8,}={0,2}(?![A-Za-z0-9+/=_-])")


def clean(text: str) -> str:
    """NFKC with invisible characters removed: same letters, same reading, one encoding."""
    return unicodedata.normalize("NFKC", text).translate(_INVISIBLE)


def to_ascii(text: str) -> str:
    """Transliterated to ASCII: other scripts, look-alike letters and accents become plain letters."""
    return anyascii(clean(text))


def unleet(text: str) -> str:
    """Leetspeak digits and symbols read as letters, in words that have letters ("N4k4mur4")."""
    return _MIXED.sub(lambda m: m.group(0).translate(_LEET), text)


def decoded(text: str) -> list[str]:
    """Texts hidden in base64 runs of the prompt (those that decode to mostly printable UTF-8)."""
    out = []
    for match in _BASE64.finditer(text):
        token = match.group(0)
        padded = token + "=" * (-len(token) % 4)
        for decoder in (base64.b64decode, base64.urlsafe_b64decode):
            try:
                raw = decoder(padded)
            except (binascii.Error, ValueError):
                continue
            try:
                plain = raw.decode("utf-8")
            except UnicodeDecodeError:
                continue
            if plain and sum(c.isprintable() or c.isspace() for c in plain) >= 0.9 * len(plain):
                out.append(plain)
                break
    return out


def views(text: str) -> list[str]:
    """The prompt as written, transliterated with leetspeak read as letters, and what its base64 runs
    decode to (once; a decoded text is not decoded again)."""
    plain = unleet(to_ascii(text))
    out = [text] if plain == text else [text, plain]
    for hidden in decoded(text):
        out += [hidden, unleet(to_ascii(hidden))]
    return out


def letters(text: str) -> str:
    """Lower-case ASCII letters only: spacing, punctuation, digits and case gone."""
    return re.sub(r"[^a-z]", "", text.lower())


NATO = {
    w: w[0]
    for w in "alfa alpha bravo charlie delta echo foxtrot golf hotel india juliet juliett kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray x-ray yankee zulu".split()
}
_NATO_WORDS = "|".join(re.escape(w) for w in sorted(NATO, key=len, reverse=True))
_NATO_RUN = re.compile(rf"\b(?:(?:{_NATO_WORDS})\b[\s,.;:/-]*){{3,}}", re.IGNORECASE)


def nato_letters(text: str) -> str:
    """The letters spelled by runs of three or more NATO code words ("Juliet Alpha India ..." -> "jai...")."""
    return " ".join(
        "".join(NATO[w.lower()] for w in re.findall(r"[A-Za-z-]+", run.group(0)) if w.lower() in NATO)
        for run in _NATO_RUN.finditer(text)
    )


def compact_forms(text: str, text_views: list[str] | None = None) -> list[str]:
    """Letters-only strings a whole name is searched in: each view's letters (digits read as leetspeak,
    and dropped: "J1a2i3m4e5"), the letters NATO code words spell, each also reversed and ROT13'd.
    `text_views`: `views(text)`, where the caller has them already."""
    forms = []
    for view in text_views if text_views is not None else views(text):
        ascii_view = to_ascii(view)
        for plain in dict.fromkeys((letters(unleet(ascii_view)), letters(ascii_view), letters(nato_letters(view)))):
            if plain:
                forms += [plain, plain[::-1], codecs.encode(plain, "rot13")]
    return forms
