//! `weft report -f TEMPLATE` and `GET /report?format=TEMPLATE`: the report through a Go
//! text/template, as `weave report -f` did, so that operators' scripts
//! (`{{.Router.Name}}`, `{{range .IPAM.Entries}}...{{end}}`, `{{len .Router.Peers}}`,
//! `{{json .IPAM}}`) keep working. The template engine is gtmpl (Go's syntax and builtins:
//! `range`, `if`, `printf`, `len`, `index`, comparisons); weft adds Weave's `json`. The
//! API is local, but a template must still not take the daemon down: named templates
//! (`define`, `template`, `block`) are refused, nesting and nested `range`s are bounded
//! (gtmpl recurses; a stack overflow aborts the process), `printf` widths are bounded,
//! the output is capped, and it runs on a thread with a stack of its own.

use super::report::Report;
use gtmpl::{Context, FuncError, Template, Value};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TemplateError {
    #[error("template does not parse: {0}")]
    Parse(String),
    #[error("template failed: {0}")]
    Execute(String),
}

/// The report's JSON (Weave's keys) as template data.
fn to_value(v: &serde_json::Value) -> Value {
    use serde_json::Value as J;
    match v {
        J::Null => Value::Nil,
        J::Bool(b) => Value::Bool(*b),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::from(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::String(s) => Value::String(s.clone()),
        J::Array(a) => Value::Array(a.iter().map(to_value).collect()),
        J::Object(o) => Value::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), to_value(v)))
                .collect::<HashMap<_, _>>(),
        ),
    }
}

/// Back to JSON for `json`; maps come out with sorted keys (as Go's encoder sorts maps).
fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::NoValue | Value::Nil | Value::Function(_) => J::Null,
        Value::Bool(b) => J::Bool(*b),
        Value::String(s) => J::String(s.clone()),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                J::from(u)
            } else if let Some(i) = n.as_i64() {
                J::from(i)
            } else {
                n.as_f64().map_or(J::Null, J::from)
            }
        }
        Value::Array(a) => J::Array(a.iter().map(to_json).collect()),
        Value::Object(o) | Value::Map(o) => J::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), to_json(v)))
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect(),
        ),
    }
}

/// Weave's `json` template function: the argument marshalled as JSON.
fn json(args: &[Value]) -> Result<Value, FuncError> {
    match args {
        [v] => Ok(Value::String(to_json(v).to_string())),
        _ => Err(FuncError::ExactlyXArgs("json".into(), 1)),
    }
}

/// Longest template accepted: scripts' templates are a line or two.
pub const MAX_TEMPLATE: usize = 8 * 1024;
/// Deepest nesting of parentheses and of blocks (an `else if` or `else with` adds a level:
/// gtmpl parses it as a nested block). gtmpl parses and executes by recursion, and a stack
/// overflow aborts the whole daemon (it cannot be caught), so a template nested past what
/// any script needs is refused before it is parsed.
pub const MAX_NESTING: usize = 32;
/// Most `range` blocks inside one another: each multiplies the work by the length of
/// what it ranges over (thousands of ring entries), so three could run for hours.
pub const MAX_RANGE_NESTING: usize = 2;
/// Largest answer: a whole report is tens of KiB.
pub const MAX_OUTPUT: usize = 1024 * 1024;
/// Largest width or precision in a `printf` verb (Rust's formatter panics above 65535).
const MAX_WIDTH: usize = 256;
/// Stack of the thread a template runs on: room for [`MAX_NESTING`] levels many times
/// over, as a second line of defence behind the scan.
const STACK: usize = 64 * 1024 * 1024;

/// What [`shape`] finds out about a template before gtmpl sees it.
#[derive(Debug, Default, PartialEq)]
struct Shape {
    depth: usize,
    ranges: usize,
}

/// Scans the actions (`{{...}}`) of `t` the way Go's lexer does — quoted, raw and
/// character literals and comments skipped — for the deepest nesting of parentheses and
/// blocks and of `range` blocks. `Err` names what is refused outright: `define`,
/// `template` and `block`, whose calls can recurse without end.
fn shape(t: &str) -> Result<Shape, String> {
    // Blocks open: (is a range, levels it added: 1, plus one per `else if`/`else with`).
    let mut blocks: Vec<(bool, usize)> = Vec::new();
    let mut max = Shape::default();
    let mut rest = t;
    while let Some(at) = rest.find("{{") {
        let mut action = &rest[at + 2..];
        // The action's words, literals and comments left out, and its parentheses.
        let mut words = String::new();
        let mut parens = 0usize;
        let mut max_parens = 0usize;
        loop {
            if action.starts_with("}}") {
                action = &action[2..];
                break;
            }
            if let Some(c) = action.strip_prefix("/*") {
                action = c.find("*/").map_or("", |e| &c[e + 2..]);
                continue;
            }
            let Some(c) = action.chars().next() else {
                // gtmpl 0.7's lexer loops for ever on some unclosed actions (found by
                // fuzzing: `{{(.x)}.`), so none reaches it.
                return Err("unclosed action: every {{ needs its }}".into());
            };
            action = &action[c.len_utf8()..];
            match c {
                '"' | '\'' | '`' => {
                    // To the closing quote; backslash escapes in all but raw strings.
                    let mut chars = action.char_indices();
                    let mut end = action.len();
                    while let Some((i, d)) = chars.next() {
                        if d == '\\' && c != '`' {
                            chars.next();
                        } else if d == c {
                            end = i + d.len_utf8();
                            break;
                        }
                    }
                    action = &action[end..];
                    words.push(' ');
                }
                '(' => {
                    parens += 1;
                    max_parens = max_parens.max(parens);
                    words.push(' ');
                }
                ')' => {
                    parens = parens.saturating_sub(1);
                    words.push(' ');
                }
                c => words.push(c),
            }
        }
        rest = action;
        let mut w = words
            .trim_start_matches('-')
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty());
        let depth_now: usize = blocks.iter().map(|b| b.1).sum();
        max.depth = max.depth.max(depth_now + max_parens);
        match w.next() {
            Some(named @ ("define" | "template" | "block")) => {
                return Err(format!(
                    "{named:?} is not supported: named templates may call themselves without end"
                ))
            }
            Some(opener @ ("if" | "range" | "with")) => {
                blocks.push((opener == "range", 1));
                let ranges = blocks.iter().filter(|b| b.0).count();
                max.ranges = max.ranges.max(ranges);
                max.depth = max.depth.max(depth_now + 1 + max_parens);
            }
            Some("else") => {
                if matches!(w.next(), Some("if" | "with")) {
                    if let Some(b) = blocks.last_mut() {
                        b.1 += 1;
                    }
                    max.depth = max.depth.max(depth_now + 1 + max_parens);
                }
            }
            Some("end") => {
                blocks.pop();
            }
            _ => {}
        }
    }
    Ok(max)
}

/// Refuses what gtmpl could not run safely, before it parses anything.
fn check(template: &str) -> Result<(), TemplateError> {
    if template.len() > MAX_TEMPLATE {
        return Err(TemplateError::Parse(format!(
            "template of {} bytes, over the limit of {MAX_TEMPLATE}",
            template.len()
        )));
    }
    // gtmpl 0.7's lexer panics on some multi-byte characters (it backs up into the
    // middle of one; found by fuzzing), and no script needs anything but ASCII.
    if let Some(c) = template
        .chars()
        .find(|c| !(c.is_ascii_graphic() || matches!(c, ' ' | '\n' | '\t' | '\r')))
    {
        return Err(TemplateError::Parse(format!(
            "character {c:?} is not supported: templates are printable ASCII"
        )));
    }
    let shape = shape(template).map_err(TemplateError::Parse)?;
    if shape.depth > MAX_NESTING {
        return Err(TemplateError::Parse(format!(
            "template nested deeper than {MAX_NESTING} levels"
        )));
    }
    if shape.ranges > MAX_RANGE_NESTING {
        return Err(TemplateError::Parse(format!(
            "more than {MAX_RANGE_NESTING} range blocks inside one another"
        )));
    }
    Ok(())
}

/// gtmpl's `printf`, with widths and precisions bounded and none taken from an argument
/// (`%*d`): a huge width is a huge allocation, and above 65535 a panic.
fn bounded_printf(args: &[Value]) -> Result<Value, FuncError> {
    if let Some(Value::String(format)) = args.first() {
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                continue;
            }
            let mut number = String::new();
            while let Some(&d) = chars.peek() {
                match d {
                    '*' => {
                        return Err(FuncError::Generic(
                            "printf: widths and precisions from arguments (*) are not supported"
                                .into(),
                        ))
                    }
                    '0'..='9' => number.push(d),
                    '+' | '-' | '#' | ' ' | '.' | '[' | ']' => {
                        if number.parse::<usize>().is_ok_and(|n| n > MAX_WIDTH) {
                            break;
                        }
                        number.clear();
                    }
                    _ => break,
                }
                chars.next();
            }
            if number.len() > 3 || number.parse::<usize>().is_ok_and(|n| n > MAX_WIDTH) {
                return Err(FuncError::Generic(format!(
                    "printf: width or precision over {MAX_WIDTH}"
                )));
            }
        }
    }
    gtmpl::funcs::printf(args)
}

/// Collects a template's output, failing past [`MAX_OUTPUT`].
struct Bounded(Vec<u8>);

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_OUTPUT {
            return Err(std::io::Error::other(format!(
                "output over {MAX_OUTPUT} bytes"
            )));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn render_here(template: &str, data: serde_json::Value) -> Result<String, TemplateError> {
    let mut t = Template::default();
    t.add_func("json", json);
    t.add_func("printf", bounded_printf);
    t.parse(template)
        .map_err(|e| TemplateError::Parse(e.to_string()))?;
    let mut out = Bounded(Vec::new());
    t.execute(&mut out, &Context::from(to_value(&data)))
        .map_err(|e| TemplateError::Execute(e.to_string()))?;
    String::from_utf8(out.0).map_err(|e| TemplateError::Execute(e.to_string()))
}

/// How long a template may run. Within the bounds above one finishes in milliseconds; a
/// template that does not has met a gtmpl bug (its lexer hangs on inputs the scan does
/// not know of yet) and is abandoned.
const DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Templates rendering at once: an abandoned one keeps its thread, so at most this many
/// threads can ever be lost to templates, and further requests are refused instead.
const MAX_RUNNING: usize = 2;
static RUNNING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One of the [`MAX_RUNNING`] slots, given back on drop.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The checks and the rendering on the calling thread, with no deadline: for the fuzz
/// target, whose own timeout must see a hang rather than have it abandoned.
pub fn render_on_this_thread(template: &str, report: &Report) -> Result<String, TemplateError> {
    check(template)?;
    let data = serde_json::to_value(report).map_err(|e| TemplateError::Execute(e.to_string()))?;
    render_here(template, data)
}

/// Renders `template` over the report, on a thread of its own with a large stack (a
/// blocking call: from async code, run it with `spawn_blocking`).
pub fn render(template: &str, report: &Report) -> Result<String, TemplateError> {
    use std::sync::atomic::Ordering;
    check(template)?;
    let data = serde_json::to_value(report).map_err(|e| TemplateError::Execute(e.to_string()))?;
    if RUNNING.fetch_add(1, Ordering::SeqCst) >= MAX_RUNNING {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return Err(TemplateError::Execute(format!(
            "{MAX_RUNNING} templates are still running; try again later"
        )));
    }
    let template = template.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("report-template".into())
        .stack_size(STACK)
        .spawn(move || {
            // The slot is freed when the work ends (or panics), not when the caller stops
            // waiting.
            let slot = Slot;
            let r = render_here(&template, data);
            drop(slot);
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
        return Err(TemplateError::Execute(format!(
            "cannot start the template thread: {e}"
        )));
    }
    match rx.recv_timeout(DEADLINE) {
        Ok(r) => r,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(TemplateError::Execute(format!(
            "the template did not finish within {DEADLINE:?}"
        ))),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(TemplateError::Execute("the template engine failed".into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::status::tests::sample_report;

    #[test]
    fn fields_range_printf_len_and_json_work_as_in_weaves_scripts() {
        let r = sample_report();
        assert_eq!(render("{{.Router.Name}}", &r).unwrap(), "02:77:76:00:00:01");
        assert_eq!(render("{{len .Router.Peers}}", &r).unwrap(), "2");
        assert_eq!(
            render("{{range .Router.Peers}}{{.NickName}} {{end}}", &r).unwrap(),
            "n1 n2 "
        );
        assert_eq!(
            render(
                r#"{{range .IPAM.Entries}}{{printf "%s/%d" .Token .Size}};{{end}}"#,
                &r
            )
            .unwrap(),
            "192.168.0.0/21845;192.168.85.85/21845;192.168.170.170/21846;"
        );
        assert_eq!(
            render(r#"{{if .Ready}}up{{else}}down{{end}}"#, &r).unwrap(),
            "up"
        );
        let targets: serde_json::Value =
            serde_json::from_str(&render("{{json .Router.Targets}}", &r).unwrap()).unwrap();
        assert_eq!(targets, serde_json::json!(["10.200.0.2", "10.200.0.3"]));
        let ipam: serde_json::Value =
            serde_json::from_str(&render("{{json .IPAM}}", &r).unwrap()).unwrap();
        assert_eq!(ipam["Range"], "192.168.0.0/16");
    }

    #[test]
    fn a_bad_template_is_an_error_not_a_guess() {
        let r = sample_report();
        assert!(matches!(
            render("{{.Router.Name", &r),
            Err(TemplateError::Parse(_))
        ));
        assert!(matches!(
            render("{{json}}", &r),
            Err(TemplateError::Execute(_))
        ));
    }

    #[test]
    fn deeply_nested_or_huge_templates_are_refused_before_they_can_overflow_the_stack() {
        let r = sample_report();
        let parens = |d: usize| format!("{{{{{}.Version{}}}}}", "(".repeat(d), ")".repeat(d));
        let ifs = |d: usize| format!("{}x{}", "{{if true}}".repeat(d), "{{- end}}".repeat(d));
        // The deepest accepted nesting renders.
        assert_eq!(render(&parens(MAX_NESTING - 1), &r).unwrap(), "0.1.0");
        assert_eq!(render(&ifs(MAX_NESTING), &r).unwrap(), "x");
        let refused = |t: &str| matches!(render(t, &r), Err(TemplateError::Parse(_)));
        for d in [MAX_NESTING + 1, 1000, 3000] {
            assert!(refused(&parens(d)), "{d}");
            assert!(refused(&ifs(d)), "{d}");
        }
        assert!(refused(&"x".repeat(MAX_TEMPLATE + 1)));
        // A template that calls itself recurses without bound.
        assert!(refused(
            r#"{{define "a"}}{{template "a"}}{{end}}{{template "a"}}"#
        ));
        // Closing parentheses in strings or in text do not hide the nesting...
        let quoted = format!(
            "{{{{print {}1{}}}}}",
            "(print \")\" ".repeat(600),
            ")".repeat(600)
        );
        assert!(refused(&quoted));
        let texty = format!("{}{}", "{{if 1}})".repeat(500), "{{end}}".repeat(500));
        assert!(refused(&texty));
        // ...nor does an else-if chain, which gtmpl parses as nested blocks.
        let chain = format!("{{{{if 0}}}}{}{{{{end}}}}", "{{else if 0}}".repeat(500));
        assert!(refused(&chain));
        // Anything but printable ASCII (gtmpl's lexer panics on some: found by fuzzing).
        assert!(refused("{Rou{{\u{62d}o)\u{0}\u{0}\u{8}Name}}{.}"));
        assert!(refused("{{.Router.Name}} \u{2192}"));
        // Unclosed actions (gtmpl's lexer hangs on some: found by fuzzing).
        for t in ["{{(.eVsirOnA)}.", "{{.Version", "{{.Version}", "x {{ \"}}"] {
            assert!(refused(t), "{t}");
        }
        // Siblings are not nesting.
        assert_eq!(
            render(&"{{if true}}y{{end}}".repeat(100), &r).unwrap(),
            "y".repeat(100)
        );
        // A long else-if chain within the bound still works.
        let short_chain = format!("{{{{if 0}}}}{}z{{{{end}}}}", "{{else if 0}}".repeat(5));
        assert_eq!(render(&short_chain, &r).unwrap(), "");
    }

    #[test]
    fn work_and_output_are_bounded() {
        let mut r = sample_report();
        let e = r.ipam.entries[0].clone();
        r.ipam.entries = vec![e; 2000];
        let refused = |t: &str, r: &Report| matches!(render(t, r), Err(TemplateError::Parse(_)));
        // Three ranges inside one another would be 8e9 iterations.
        let three = "{{range .IPAM.Entries}}{{range $.IPAM.Entries}}{{range $.IPAM.Entries}}.{{end}}{{end}}{{end}}";
        assert!(refused(three, &r));
        // Two are allowed, but their output stops at the cap.
        let two =
            r#"{{range .IPAM.Entries}}{{range $.IPAM.Entries}}{{printf "%200d" 1}}{{end}}{{end}}"#;
        match render(two, &r) {
            Err(TemplateError::Execute(e)) => assert!(e.contains("output over"), "{e}"),
            other => panic!("{:?}", other.map(|s| s.len())),
        }
        // Widths: bounded, and never from an argument.
        for t in [
            r#"{{printf "%99999999999d" 1}}"#,
            r#"{{printf "%65536d" 1}}"#,
            r#"{{printf "%*d" 100000 1}}"#,
            r#"{{printf "%.9999f" 1.5}}"#,
        ] {
            assert!(
                matches!(render(t, &r), Err(TemplateError::Execute(_))),
                "{t}"
            );
        }
        assert_eq!(
            render(r#"{{printf "%5d|%-4s|" 42 "ab"}}"#, &r).unwrap(),
            "   42|ab  |"
        );
    }
}
