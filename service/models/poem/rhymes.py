"""Chinese phonology for the poem model: which characters rhyme, and which are Chinese characters at all."""

from functools import cache

from pypinyin import Style, lazy_pinyin

ZHI_SYLLABLES = {"zhi", "chi", "shi", "ri", "zi", "ci", "si"}  # final "-i", which does not rhyme with 衣 (yi)
RHYME_MODEL = (
    "same final (韵母) in pypinyin (lazy_pinyin, the character's most common reading), with both "
    "strict=True and strict=False finals equal, and zhi/chi/shi/ri/zi/ci/si kept apart from ji/qi/xi: "
    "光/霜/窗 share 'uang', 天/年/边 'ian', 雨/居 'v'. A rhyme is never repeated within a poem. Exact "
    "finals are a stricter rule than the groups of 中华新韵, so a poem rhymes under those too; not always "
    "under 平水韵 (东 and 冬 share 'ong' but not a Pingshui group): meter \"regulated\" rhymes on that table"
)


@cache
def rhyme_of(char: str) -> str | None:
    """The rhyme class of a character: its final, e.g. 'uang' for 光 and 霜; None if it has no reading."""
    if not is_hanzi(char):
        return None
    strict = lazy_pinyin(char, style=Style.FINALS, strict=True)[0]
    loose = lazy_pinyin(char, style=Style.FINALS, strict=False)[0]
    if not strict:
        return None
    if lazy_pinyin(char)[0] in ZHI_SYLLABLES:
        strict = "-i"
    return strict if strict == loose else f"{strict}|{loose}"


def is_hanzi(char: str) -> bool:
    """A character of the basic CJK block, the only block the corpus keeps."""
    return len(char) == 1 and "\u4e00" <= char <= "\u9fff"


HANZI = "[\u4e00-\u9fff]"  # the same block, as a regular expression
