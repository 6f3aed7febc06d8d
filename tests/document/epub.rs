use std::io::Write;
use std::path::{Path, PathBuf};

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, ZipWriter};

use crate::util::{assert_clean_error, extract, extract_json};

pub const CONTAINER: &str = r#"<?xml version="1.0"?>
<container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">
  <rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>
</container>"#;

const OPF: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<package xmlns="http://www.idpf.org/2007/opf" version="3.0" unique-identifier="id">
  <metadata xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:title>A Test Book</dc:title></metadata>
  <manifest>
    <item id="nav" href="nav.xhtml" media-type="application/xhtml+xml" properties="nav"/>
    <item id="c2" href="text/ch2.xhtml" media-type="application/xhtml+xml"/>
    <item id="c1" href="text/ch1.xhtml" media-type="application/xhtml+xml"/>
    <item id="c3" href="text/ch3.xhtml" media-type="application/xhtml+xml"/>
  </manifest>
  <spine><itemref idref="c1"/><itemref idref="c2"/><itemref idref="c3"/></spine>
</package>"#;

const NAV: &str = r#"<html xmlns="http://www.w3.org/1999/xhtml" xmlns:epub="http://www.idpf.org/2007/ops"><body>
<nav epub:type="toc"><ol><li><a href="text/ch1.xhtml">Chapter One: Arrival</a></li>
<li><a href="text/ch2.xhtml#start">Chapter Two: Departure</a></li></ol></nav></body></html>"#;

fn chapter(heading: &str, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><html xmlns=\"http://www.w3.org/1999/xhtml\">\
         <head><title>ignored</title></head><body><h1>{heading}</h1>{body}</body></html>"
    )
}

/// Writes an EPUB with the given entries after the stored `mimetype` entry.
pub fn write_epub(path: &Path, entries: &[(&str, &[u8])]) {
    let file = std::fs::File::create(path).expect("create epub");
    let mut zip = ZipWriter::new(file);
    let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
    zip.start_file("mimetype", stored).expect("mimetype");
    zip.write_all(b"application/epub+zip").expect("mimetype");
    let deflated = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
    for (name, bytes) in entries {
        zip.start_file(*name, deflated).expect("entry");
        zip.write_all(bytes).expect("entry");
    }
    zip.finish().expect("finish epub");
}

fn book(dir: &Path) -> PathBuf {
    let path = dir.join("book.epub");
    let ch1 = chapter(
        "Arrival",
        "<p>It was a <em>bright</em> cold day.</p><p>Second&#160;para&amp;more.</p>",
    );
    let ch2 = chapter("Departure", "<p>They left at dawn.</p>");
    let ch3 = "<html><body><h2>Epilogue</h2><p>The end.</p></body></html>".to_string();
    write_epub(
        &path,
        &[
            ("META-INF/container.xml", CONTAINER.as_bytes()),
            ("OEBPS/content.opf", OPF.as_bytes()),
            ("OEBPS/nav.xhtml", NAV.as_bytes()),
            ("OEBPS/text/ch1.xhtml", ch1.as_bytes()),
            ("OEBPS/text/ch2.xhtml", ch2.as_bytes()),
            ("OEBPS/text/ch3.xhtml", ch3.as_bytes()),
        ],
    );
    path
}

#[test]
fn spine_order_chapters_and_titles() {
    let dir = tempfile::tempdir().expect("temp dir");
    let doc = extract_json(&book(dir.path()));
    assert_eq!(doc["kind"], "epub");
    assert_eq!(doc["title"], "A Test Book");
    let text = doc["text"].as_str().expect("text");
    assert_eq!(
        text,
        "Arrival\n\nIt was a bright cold day.\n\nSecond para&more.\n\nDeparture\n\nThey left at dawn.\n\nEpilogue\n\nThe end."
    );
    let titles: Vec<&str> = doc["sections"]
        .as_array()
        .expect("sections")
        .iter()
        .map(|s| s["title"].as_str().expect("title"))
        .collect();
    // From the nav document, else the chapter's first heading.
    assert_eq!(
        titles,
        vec!["Chapter One: Arrival", "Chapter Two: Departure", "Epilogue"]
    );
    let pages = doc["pages"].as_array().expect("pages");
    assert_eq!(pages.len(), 3);
    let start = pages[1]["text_range"]["start"].as_u64().expect("start") as usize;
    assert!(text[start..].starts_with("Departure"));
    assert_eq!(pages[2]["synthetic"], true);
}

#[test]
fn an_epub_without_a_package_is_one_clean_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broken.epub");
    write_epub(&path, &[("META-INF/container.xml", CONTAINER.as_bytes())]);
    assert_clean_error(
        &extract(&path, false),
        &path,
        "not an EPUB or damaged beyond reading (missing 'OEBPS/content.opf')",
        5,
    );
}
