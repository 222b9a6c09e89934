"""``report.html``: one self-contained page a person opens in a browser. The timeline picture, a summary, and a
table of the shots (thumbnail, first and last frame with their times, length, how the shot begins, the earlier
shot it shows again as a link to that shot's row). Pictures are inlined as ``data:`` URIs and the style sheet
is in the page: it makes no request and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
from html import escape

from engine.stream.events import Shot, Transition
from engine.stream.scenelist import scene_rows, timecode, transition_name

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
img.timeline { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: middle; }
th { background: #eef2e6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:target { background: #fff6cc; }
.cut { color: #c00; } .dissolve { color: #d80; } .fade { color: #555; } .wipe, .push, .slide { color: #07a; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; } dt { font-weight: 600; }
"""


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


def report_html(*, title: str, summary: dict, shots: list[Shot], transitions: list[Transition],
                fps: float | None, timeline_png: bytes, thumbnails: dict[int, bytes], note: str = "") -> bytes:
    """The page (UTF-8 bytes). ``summary``: label -> value lines shown above the table; ``thumbnails``: JPEG bytes
    by shot index (a shot without one shows none); ``note``: a sentence shown under the table, if any."""
    rows = scene_rows(shots, transitions)
    number_of = {r.shot.index: r.number for r in rows}

    def t(frame: int) -> str:
        return "" if not fps else timecode(frame / fps)

    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{escape(title)}</title>", f"<style>{STYLE}</style>", "</head>", "<body>",
           f"<h1>{escape(title)}</h1>", "<dl>"]
    for k, v in summary.items():
        out.append(f"<dt>{escape(str(k))}</dt><dd>{escape(str(v))}</dd>")
    out += ["</dl>", "<h2>Timeline</h2>",
            f'<img class="timeline" alt="similarity timeline" src="{data_uri("image/png", timeline_png)}">',
            "<h2>Shots</h2>", "<table>",
            ("<tr><th>Shot</th><th>Picture (middle frame)</th><th>First frame</th><th>Start</th><th>Last frame</th>"
             "<th>End</th><th>Frames</th><th>Begins with</th><th>Shows again</th></tr>")]
    for r in rows:
        sh = r.shot
        thumb = thumbnails.get(sh.index)
        pic = "" if thumb is None else \
            f'<img alt="shot {r.number}, frame {sh.start + (sh.end - sh.start + 1) // 2}" ' \
            f'src="{data_uri("image/jpeg", thumb)}">'
        if r.into is None:
            begins = "start of the video"
        else:
            kind = transition_name(r.into)
            span = "" if r.into.first == r.into.last else f" (frames {r.into.first}&ndash;{r.into.last})"
            begins = f'<span class="{kind}">{kind}</span>{span}'
        again = sh.recurs_with
        if again is not None and again in number_of:
            score = "" if sh.recurrence_score is None else f" (similarity {sh.recurrence_score:.2f})"
            shows = f'<a href="#shot-{number_of[again]}">shot {number_of[again]}</a>{score}'
        else:
            shows = ""
        out.append(f'<tr id="shot-{r.number}"><td class="num">{r.number}</td><td>{pic}</td>'
                   f'<td class="num">{sh.start}</td><td>{t(sh.start)}</td><td class="num">{sh.end}</td>'
                   f'<td>{t(sh.end + 1)}</td><td class="num">{r.length}</td><td>{begins}</td><td>{shows}</td></tr>')
    out.append("</table>")
    out.append("<p>Frames count from 0; a shot's first and last frames are both in it. Start and End are the "
               "times where the shot starts and stops (End: its last frame's time plus one frame). The frames of a "
               "dissolve or fade belong to neither shot.</p>")
    if note:
        out.append(f"<p>{escape(note)}</p>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out).encode("utf-8")
