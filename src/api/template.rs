//! `weft report -f TEMPLATE` and `GET /report?format=TEMPLATE`: the report through a Go
//! text/template, as `weave report -f` did, so that operators' scripts
//! (`{{.Router.Name}}`, `{{range .IPAM.Entries}}...{{end}}`, `{{len .Router.Peers}}`,
//! `{{json .IPAM}}`) keep working. The template engine is gtmpl (Go's syntax and builtins:
//! `range`, `if`, `printf`, `len`, `index`, comparisons); weft adds Weave's `json`.

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

/// Renders `template` over the report.
pub fn render(template: &str, report: &Report) -> Result<String, TemplateError> {
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
}
