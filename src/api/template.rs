//! `weft report -f TEMPLATE` and `GET /report?format=TEMPLATE`: the report through a Go
//! text/template, as `weave report -f` did, so that operators' scripts
//! (`{{.Router.Name}}`, `{{range .IPAM.Entries}}...{{end}}`, `{{len .Router.Peers}}`,
//! `{{json .IPAM}}`) keep working. The template engine is gtmpl (Go's syntax and builtins:
//! `range`, `if`, `printf`, `len`, `index`, comparisons); weft adds Weave's `json`. Named
//! templates (`define`, `template`, `block`) are refused, and nesting is bounded: gtmpl
//! recurses, and a stack overflow would abort the daemon.

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
/// Deepest nesting of parentheses and blocks accepted. gtmpl parses and executes by
/// recursion, and a stack overflow aborts the whole daemon (it cannot be caught), so a
/// template nested past what any script needs is refused before it is parsed.
pub const MAX_NESTING: usize = 32;

/// The deepest nesting of `(` and of `{{if|range|with ...}}...{{end}}` in `t`, counted
/// conservatively (parentheses in literal text count too); `Err` with the action's name
/// for `define`, `template` and `block`, whose calls can recurse without bound.
fn nesting(t: &str) -> Result<usize, &str> {
    const OPENERS: [&str; 3] = ["if", "range", "with"];
    const NAMED: [&str; 3] = ["define", "template", "block"];
    let (mut depth, mut max) = (0usize, 0usize);
    let mut rest = t;
    while let Some(c) = rest.chars().next() {
        if let Some(action) = rest.strip_prefix("{{") {
            let word = action
                .trim_start_matches('-')
                .trim_start()
                .split(|c: char| !c.is_ascii_alphabetic())
                .next()
                .unwrap_or("");
            if NAMED.contains(&word) {
                return Err(word);
            }
            if OPENERS.contains(&word) {
                depth += 1;
            } else if word == "end" {
                depth = depth.saturating_sub(1);
            }
            max = max.max(depth);
            rest = action;
            continue;
        }
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        max = max.max(depth);
        rest = &rest[c.len_utf8()..];
    }
    Ok(max)
}

/// Renders `template` over the report.
pub fn render(template: &str, report: &Report) -> Result<String, TemplateError> {
    if template.len() > MAX_TEMPLATE {
        return Err(TemplateError::Parse(format!(
            "template of {} bytes, over the limit of {MAX_TEMPLATE}",
            template.len()
        )));
    }
    match nesting(template) {
        Err(action) => {
            return Err(TemplateError::Parse(format!(
                "{action:?} is not supported: named templates may call themselves without end"
            )))
        }
        Ok(depth) if depth > MAX_NESTING => {
            return Err(TemplateError::Parse(format!(
                "template nested deeper than {MAX_NESTING} levels"
            )))
        }
        Ok(_) => {}
    }
    let data = serde_json::to_value(report).map_err(|e| TemplateError::Execute(e.to_string()))?;
    let mut t = Template::default();
    t.add_func("json", json);
    t.parse(template)
        .map_err(|e| TemplateError::Parse(e.to_string()))?;
    t.render(&Context::from(to_value(&data)))
        .map_err(|e| TemplateError::Execute(e.to_string()))
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
        // The deepest accepted nesting renders (on a test thread's 2 MiB stack).
        assert_eq!(render(&parens(MAX_NESTING), &r).unwrap(), "0.1.0");
        assert_eq!(render(&ifs(MAX_NESTING), &r).unwrap(), "x");
        for d in [MAX_NESTING + 1, 1000, 3000] {
            assert!(matches!(
                render(&parens(d), &r),
                Err(TemplateError::Parse(_))
            ));
            assert!(matches!(render(&ifs(d), &r), Err(TemplateError::Parse(_))));
        }
        assert!(matches!(
            render(&"x".repeat(MAX_TEMPLATE + 1), &r),
            Err(TemplateError::Parse(_))
        ));
        // A template that calls itself recurses without bound.
        let selfcall = r#"{{define "a"}}{{template "a"}}{{end}}{{template "a"}}"#;
        assert!(matches!(render(selfcall, &r), Err(TemplateError::Parse(_))));
        // Siblings are not nesting.
        assert_eq!(
            render(&"{{if true}}y{{end}}".repeat(100), &r).unwrap(),
            "y".repeat(100)
        );
    }
}
