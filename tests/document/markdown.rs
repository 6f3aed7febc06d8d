use slm_chat::document::DocKind;

use crate::util::{load, temp_file};

#[test]
fn headings_become_sections() {
    let source = "# The Guide\n\nIntro with *style* and `code`.\n\n## Install\n\nRun it.\n\n\
                  ### Linux\n\nUse apt.\n\n## Use\n\n- one\n- two\n";
    let (_dir, path) = temp_file("guide.md", source.as_bytes());
    let doc = load(&path).expect("markdown loads");
    assert_eq!(doc.kind, DocKind::Markdown);
    assert_eq!(doc.title, "The Guide");
    assert_eq!(
        doc.text,
        "The Guide\n\nIntro with style and code.\n\nInstall\n\nRun it.\n\nLinux\n\nUse apt.\n\nUse\n\n- one\n\n- two"
    );
    let sections: Vec<(&str, u8, &str)> = doc
        .sections
        .iter()
        .map(|s| (s.title.as_str(), s.level, &doc.text[s.text_range.clone()]))
        .collect();
    assert_eq!(
        sections,
        vec![
            ("The Guide", 1, doc.text.as_str()),
            ("Install", 2, "Install\n\nRun it.\n\nLinux\n\nUse apt."),
            ("Linux", 3, "Linux\n\nUse apt."),
            ("Use", 2, "Use\n\n- one\n\n- two"),
        ]
    );
    assert_eq!(doc.pages.len(), 1);
    assert!(doc.pages[0].synthetic);
}
