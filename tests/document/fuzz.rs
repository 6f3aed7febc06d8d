use proptest::prelude::*;

use super::epub::{write_epub, CONTAINER};
use crate::util::{load, temp_file};

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Any bytes under a text, Markdown or EPUB name give a Document or an error, never a panic.
    /// (A `%PDF` header would go to the PDF worker; random bytes almost never start with it.)
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096),
                                   name in prop::sample::select(vec!["a.txt", "b.md", "c.epub", "d"])) {
        let (_dir, path) = temp_file(name, &bytes);
        if let Ok(doc) = load(&path) {
            prop_assert!(doc.pages.iter().all(|p| p.text_range.end <= doc.text.len()));
        }
    }

    /// Markdown-ish text keeps sections inside the text and on character boundaries.
    #[test]
    fn markdown_sections_stay_in_bounds(source in "(#{1,6} [a-zé]{0,8}\n|[a-z*_`\\[\\]()é]{0,20}\n|\n){0,40}") {
        let (_dir, path) = temp_file("m.md", source.as_bytes());
        if let Ok(doc) = load(&path) {
            for section in &doc.sections {
                prop_assert!(doc.text.get(section.text_range.clone()).is_some());
            }
        }
    }

    /// A valid zip with the EPUB structure but arbitrary package and chapter bytes.
    #[test]
    fn arbitrary_epub_contents_never_panic(opf in proptest::collection::vec(any::<u8>(), 0..512),
                                           chapter in ".{0,300}") {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("f.epub");
        let spine = format!(
            "<package><manifest><item id=\"c\" href=\"c.xhtml\"/></manifest><spine><itemref idref=\"c\"/></spine></package>{}",
            String::from_utf8_lossy(&opf)
        );
        write_epub(&path, &[
            ("META-INF/container.xml", CONTAINER.as_bytes()),
            ("OEBPS/content.opf", spine.as_bytes()),
            ("OEBPS/c.xhtml", chapter.as_bytes()),
        ]);
        let _ = load(&path);
    }
}
