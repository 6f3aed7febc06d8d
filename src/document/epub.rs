//! EPUB files (2 and 3): zip + quick-xml, no GPL `epub` crate. Follows
//! `META-INF/container.xml` to the OPF package, reads the spine in order, and turns each
//! spine item's XHTML into text. Each spine item is one synthetic page; chapter titles come
//! from the EPUB 3 nav document or the EPUB 2 NCX, else from the item's first heading.

use std::collections::HashMap;
use std::io::{Cursor, Read};

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use zip::ZipArchive;

use super::normalize::clean_text;
use super::{join_blocks, Block, DocKind, Document, DocumentError, Page, Section};

/// Largest decompressed size read from one zip entry; a bigger entry is a zip bomb, not a
/// chapter (the longest novels are a few MB of XHTML in all).
const MAX_ENTRY_BYTES: u64 = 64 << 20;

/// True for a zip whose `mimetype` entry says EPUB, or that has an EPUB container file.
pub(crate) fn looks_like_epub(bytes: &[u8]) -> bool {
    if !bytes.starts_with(b"PK\x03\x04") {
        return false;
    }
    let Ok(mut archive) = ZipArchive::new(Cursor::new(bytes)) else {
        return false;
    };
    if let Ok(mimetype) = read_entry(&mut archive, "mimetype") {
        if String::from_utf8_lossy(&mimetype).trim() == "application/epub+zip" {
            return true;
        }
    }
    let has_container = archive.by_name("META-INF/container.xml").is_ok();
    has_container
}

fn damaged(shown: &str, reason: impl Into<String>) -> DocumentError {
    DocumentError::DamagedEpub {
        path: shown.into(),
        reason: reason.into(),
    }
}

fn read_entry(archive: &mut ZipArchive<Cursor<&[u8]>>, name: &str) -> Result<Vec<u8>, String> {
    let entry = archive
        .by_name(name)
        .map_err(|_| format!("missing '{name}'"))?;
    let mut bytes = Vec::new();
    entry
        .take(MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|err| format!("cannot unpack '{name}': {}", err.to_string().to_lowercase()))?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!(
            "'{name}' unpacks to more than {MAX_ENTRY_BYTES} bytes"
        ));
    }
    Ok(bytes)
}

/// XML text as UTF-8 (EPUB allows UTF-8 and UTF-16; a BOM decides).
fn xml_text(bytes: &[u8]) -> String {
    let (text, _, _) = encoding_rs::UTF_8.decode(bytes);
    text.into_owned()
}

fn xml_reader(text: &str) -> Reader<&[u8]> {
    let mut reader = Reader::from_str(text);
    let config = reader.config_mut();
    // Real EPUBs carry sloppy XHTML; keep reading rather than reject a chapter.
    config.check_end_names = false;
    config.allow_unmatched_ends = true;
    reader
}

fn local_name(start: &BytesStart) -> String {
    String::from_utf8_lossy(start.local_name().as_ref()).to_lowercase()
}

fn attribute(start: &BytesStart, name: &str) -> Option<String> {
    start
        .attributes()
        .flatten()
        .find(|attr| {
            attr.key
                .local_name()
                .as_ref()
                .eq_ignore_ascii_case(name.as_bytes())
        })
        .map(|attr| {
            attr.unescape_value()
                .map(|value| value.into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(&attr.value).into_owned())
        })
}

/// Resolves `href` (percent-encoded, maybe with a `#fragment`) against the folder `base`
/// ("" or ending in '/') into a zip entry name.
fn resolve(base: &str, href: &str) -> String {
    let href = href.split('#').next().unwrap_or_default();
    let href = percent_decode(href);
    let joined = if href.starts_with('/') {
        href.trim_start_matches('/').to_string()
    } else {
        format!("{base}{href}")
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            part => parts.push(part),
        }
    }
    parts.join("/")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(value)) => {
                out.push(value);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn folder_of(path: &str) -> String {
    path.rfind('/')
        .map_or(String::new(), |i| path[..=i].to_string())
}

/// What the OPF package says: title, spine entries (zip names), and where the table of
/// contents lives.
#[derive(Debug, Default)]
struct Package {
    title: Option<String>,
    spine: Vec<String>,
    nav: Option<String>,
    ncx: Option<String>,
}

fn container_rootfile(xml: &str) -> Option<String> {
    let mut reader = xml_reader(xml);
    loop {
        match reader.read_event() {
            Ok(Event::Start(e) | Event::Empty(e)) if local_name(&e) == "rootfile" => {
                return attribute(&e, "full-path");
            }
            Ok(Event::Eof) | Err(_) => return None,
            _ => {}
        }
    }
}

fn parse_package(xml: &str, base: &str) -> Package {
    let mut reader = xml_reader(xml);
    let mut manifest: HashMap<String, (String, String, String)> = HashMap::new();
    let mut spine_ids = Vec::new();
    let mut toc_id = None;
    let mut title = None;
    let mut in_title = false;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if local_name(&e) == "title" && title.is_none() => in_title = true,
            Ok(Event::Text(t)) if in_title => {
                let text = t.decode().map(|s| s.into_owned()).unwrap_or_default();
                title = Some(text.trim().to_string()).filter(|s| !s.is_empty());
            }
            Ok(Event::End(_)) => in_title = false,
            Ok(Event::Start(e) | Event::Empty(e)) => match local_name(&e).as_str() {
                "item" => {
                    if let (Some(id), Some(href)) = (attribute(&e, "id"), attribute(&e, "href")) {
                        let media = attribute(&e, "media-type").unwrap_or_default();
                        let properties = attribute(&e, "properties").unwrap_or_default();
                        manifest.insert(id, (resolve(base, &href), media, properties));
                    }
                }
                "itemref" => {
                    let linear = attribute(&e, "linear").unwrap_or_default();
                    if let Some(id) = attribute(&e, "idref").filter(|_| linear != "no") {
                        spine_ids.push(id);
                    }
                }
                "spine" => toc_id = attribute(&e, "toc"),
                _ => {}
            },
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    let nav = manifest
        .values()
        .find(|(_, _, properties)| properties.split_whitespace().any(|p| p == "nav"))
        .map(|(path, _, _)| path.clone());
    let ncx = toc_id
        .and_then(|id| manifest.get(&id).map(|(path, _, _)| path.clone()))
        .or_else(|| {
            manifest
                .values()
                .find(|(_, media, _)| media == "application/x-dtbncx+xml")
                .map(|(path, _, _)| path.clone())
        });
    let spine = spine_ids
        .iter()
        .filter_map(|id| manifest.get(id).map(|(path, _, _)| path.clone()))
        .collect();
    Package {
        title,
        spine,
        nav,
        ncx,
    }
}

/// Titles by zip entry name from the NCX (`navPoint` → `navLabel/text` + `content@src`); the
/// first title for an entry wins.
fn ncx_titles(xml: &str, base: &str) -> HashMap<String, String> {
    let mut titles = HashMap::new();
    let mut reader = xml_reader(xml);
    let mut label: Option<String> = None;
    let mut in_text = false;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if local_name(&e) == "text" => in_text = true,
            Ok(Event::Text(t)) if in_text => {
                let text = t.decode().map(|s| s.into_owned()).unwrap_or_default();
                label = Some(clean_text(&text));
            }
            Ok(Event::End(_)) => in_text = false,
            Ok(Event::Start(e) | Event::Empty(e)) if local_name(&e) == "content" => {
                if let (Some(src), Some(text)) = (attribute(&e, "src"), label.take()) {
                    if !text.is_empty() {
                        titles.entry(resolve(base, &src)).or_insert(text);
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    titles
}

/// Titles by zip entry name from the EPUB 3 nav document's links (`<a href>` text).
fn nav_titles(xml: &str, base: &str) -> HashMap<String, String> {
    let mut titles = HashMap::new();
    let mut reader = xml_reader(xml);
    let mut link: Option<(String, String)> = None;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) if local_name(&e) == "a" => {
                link = attribute(&e, "href").map(|href| (resolve(base, &href), String::new()));
            }
            Ok(Event::Text(t)) => {
                if let Some((_, text)) = link.as_mut() {
                    text.push_str(&t.decode().map(|s| s.into_owned()).unwrap_or_default());
                }
            }
            Ok(Event::End(e)) if e.local_name().as_ref().eq_ignore_ascii_case(b"a") => {
                if let Some((target, text)) = link.take() {
                    let text = clean_text(&text);
                    if !text.is_empty() {
                        titles.entry(target).or_insert(text);
                    }
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            _ => {}
        }
    }
    titles
}

fn heading_level(name: &str) -> Option<u8> {
    match name {
        "h1" => Some(1),
        "h2" => Some(2),
        "h3" => Some(3),
        "h4" => Some(4),
        "h5" => Some(5),
        "h6" => Some(6),
        _ => None,
    }
}

fn is_block(name: &str) -> bool {
    matches!(
        name,
        "p" | "div"
            | "li"
            | "tr"
            | "blockquote"
            | "pre"
            | "section"
            | "article"
            | "table"
            | "ul"
            | "ol"
            | "dd"
            | "dt"
            | "figcaption"
            | "hr"
            | "aside"
            | "header"
            | "footer"
            | "body"
            | "br"
    ) || heading_level(name).is_some()
}

/// The few HTML entities EPUBs use without declaring them; XML's own five and numeric
/// references are resolved by quick-xml.
fn html_entity(name: &str) -> Option<&'static str> {
    Some(match name {
        "nbsp" => " ",
        "mdash" => "—",
        "ndash" => "–",
        "hellip" => "…",
        "lsquo" => "‘",
        "rsquo" => "’",
        "ldquo" => "“",
        "rdquo" => "”",
        "copy" => "©",
        "shy" => "",
        "amp" => "&",
        "lt" => "<",
        "gt" => ">",
        "quot" => "\"",
        "apos" => "'",
        _ => return None,
    })
}

/// XHTML body → blocks (headings keep their level); `head`, `script` and `style` are skipped.
fn xhtml_blocks(xml: &str) -> Vec<Block> {
    let mut reader = xml_reader(xml);
    let mut blocks = Vec::new();
    let mut current = String::new();
    let mut heading: Option<u8> = None;
    let mut skip_depth = 0usize;
    let mut flush = |current: &mut String, heading: Option<u8>| {
        let text = clean_text(current);
        if !text.is_empty() {
            blocks.push(Block { heading, text });
        }
        current.clear();
    };
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) => {
                let name = local_name(&e);
                if matches!(name.as_str(), "head" | "script" | "style") {
                    skip_depth += 1;
                } else if is_block(&name) {
                    flush(&mut current, heading.take());
                    heading = heading_level(&name);
                }
            }
            Ok(Event::Empty(e)) => {
                let name = local_name(&e);
                if name == "br" {
                    current.push('\n');
                } else if name == "img" {
                    if let Some(alt) = attribute(&e, "alt").filter(|alt| !alt.trim().is_empty()) {
                        current.push_str(&format!(" {alt} "));
                    }
                } else if is_block(&name) {
                    flush(&mut current, heading.take());
                }
            }
            Ok(Event::End(e)) => {
                let name = String::from_utf8_lossy(e.local_name().as_ref()).to_lowercase();
                if matches!(name.as_str(), "head" | "script" | "style") {
                    skip_depth = skip_depth.saturating_sub(1);
                } else if is_block(&name) {
                    flush(&mut current, heading.take());
                }
            }
            Ok(Event::Text(t)) if skip_depth == 0 => {
                current.push_str(&t.decode().map(|s| s.into_owned()).unwrap_or_default());
            }
            Ok(Event::CData(t)) if skip_depth == 0 => {
                current.push_str(&String::from_utf8_lossy(&t));
            }
            Ok(Event::GeneralRef(r)) if skip_depth == 0 => {
                if let Ok(Some(c)) = r.resolve_char_ref() {
                    current.push(c);
                } else if let Ok(name) = r.decode() {
                    current.push_str(html_entity(&name).unwrap_or(" "));
                }
            }
            Ok(Event::Eof) => break,
            // Malformed markup: keep what was read so far rather than lose the chapter.
            Err(_) => break,
            _ => {}
        }
    }
    flush(&mut current, heading);
    blocks
}

/// An EPUB document: one synthetic page per non-empty spine item, one level-1 section per
/// item that has a title.
/// Chapter titles by spine target, from the EPUB 3 nav document, then the EPUB 2 NCX.
fn table_of_contents(
    archive: &mut ZipArchive<Cursor<&[u8]>>,
    package: &Package,
) -> HashMap<String, String> {
    let mut toc = HashMap::new();
    for (path, is_nav) in [(&package.nav, true), (&package.ncx, false)] {
        let Some(path) = path else { continue };
        if let Ok(xml) = read_entry(archive, path) {
            let base = folder_of(path);
            let found = if is_nav {
                nav_titles(&xml_text(&xml), &base)
            } else {
                ncx_titles(&xml_text(&xml), &base)
            };
            for (target, title) in found {
                toc.entry(target).or_insert(title);
            }
        }
    }
    toc
}

pub(crate) fn load(bytes: &[u8], shown: &str, title: String) -> Result<Document, DocumentError> {
    let mut archive =
        ZipArchive::new(Cursor::new(bytes)).map_err(|_| damaged(shown, "not a readable zip"))?;
    let container =
        read_entry(&mut archive, "META-INF/container.xml").map_err(|r| damaged(shown, r))?;
    let opf_path = container_rootfile(&xml_text(&container))
        .ok_or_else(|| damaged(shown, "container.xml names no package file"))?;
    let opf = read_entry(&mut archive, &opf_path).map_err(|r| damaged(shown, r))?;
    let package = parse_package(&xml_text(&opf), &folder_of(&opf_path));
    if package.spine.is_empty() {
        return Err(damaged(shown, "the package has an empty spine"));
    }
    let toc = table_of_contents(&mut archive, &package);

    let mut text = String::new();
    let mut pages = Vec::new();
    let mut sections = Vec::new();
    let mut notes = Vec::new();
    let mut missing = Vec::new();
    for item in &package.spine {
        let xml = match read_entry(&mut archive, item) {
            Ok(xml) => xml,
            Err(reason) => {
                missing.push(reason);
                continue;
            }
        };
        let blocks = xhtml_blocks(&xml_text(&xml));
        let (body, _) = join_blocks(&blocks);
        if body.is_empty() {
            continue;
        }
        if !text.is_empty() {
            text.push_str("\n\n");
        }
        let start = text.len();
        text.push_str(&body);
        let range = start..text.len();
        let chapter = toc.get(item).cloned().or_else(|| {
            blocks
                .iter()
                .find(|block| block.heading.is_some())
                .map(|block| block.text.replace('\n', " "))
        });
        if let Some(chapter) = chapter {
            sections.push(Section {
                title: chapter,
                level: 1,
                text_range: range.clone(),
            });
        }
        pages.push(Page {
            number: pages.len() as u32 + 1,
            text_range: range,
            synthetic: true,
            extractor: "epub".into(),
            warnings: Vec::new(),
        });
    }
    if !missing.is_empty() {
        notes.push(format!(
            "{} spine item(s) could not be read: {}",
            missing.len(),
            missing.join("; ")
        ));
    }
    if text.is_empty() {
        return Err(damaged(shown, "no readable text in the spine"));
    }
    notes.push("pages are synthetic: one per spine item (chapter file) of the EPUB".into());
    Ok(Document {
        title: package.title.unwrap_or(title),
        kind: DocKind::Epub,
        text,
        pages,
        sections,
        notes,
        failed_pages: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hrefs_resolve_against_the_package_folder() {
        assert_eq!(
            resolve("OEBPS/", "text/ch%201.xhtml#s1"),
            "OEBPS/text/ch 1.xhtml"
        );
        assert_eq!(resolve("OEBPS/text/", "../ch2.xhtml"), "OEBPS/ch2.xhtml");
        assert_eq!(resolve("", "ch3.xhtml"), "ch3.xhtml");
    }

    #[test]
    fn xhtml_keeps_paragraphs_and_headings_and_drops_head() {
        let blocks = xhtml_blocks(
            "<html><head><title>skip</title><style>p{}</style></head><body>\
             <h1>Chapter&nbsp;One</h1><p>It was a <i>dark</i>&#x20;night&amp;day.</p>\
             <p>Line<br/>break</p><div>unclosed <b>bold</div></body></html>",
        );
        let got: Vec<(Option<u8>, &str)> = blocks
            .iter()
            .map(|b| (b.heading, b.text.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (Some(1), "Chapter One"),
                (None, "It was a dark night&day."),
                (None, "Line\nbreak"),
                (None, "unclosed bold"),
            ]
        );
    }

    #[test]
    fn ncx_and_nav_titles_map_to_entries() {
        let ncx = "<ncx><navMap><navPoint><navLabel><text>The Start</text></navLabel>\
                   <content src=\"ch1.xhtml#top\"/></navPoint></navMap></ncx>";
        assert_eq!(
            ncx_titles(ncx, "OEBPS/")
                .get("OEBPS/ch1.xhtml")
                .map(String::as_str),
            Some("The Start")
        );
        let nav = "<html><body><nav><ol><li><a href=\"t/ch2.xhtml\">Second <em>Part</em></a></li></ol></nav></body></html>";
        assert_eq!(
            nav_titles(nav, "").get("t/ch2.xhtml").map(String::as_str),
            Some("Second Part")
        );
    }
}
