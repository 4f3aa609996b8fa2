use super::*;

fn demo() -> Policy {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/retail-media-demo.toml");
    crate::policy::parse_text(&std::fs::read_to_string(&path).unwrap(), &path).unwrap()
}

#[test]
fn engine_errors_map_to_fixed_texts() {
    let policy = demo();
    let cases: Vec<(DataFusionError, &str, bool)> = vec![
        (
            DataFusionError::Plan("Invalid function 'max'.\nDid you mean 'sum'?".into()),
            "rule query.aggregates: max is not allowed in agreement retail-media-demo",
            true,
        ),
        (
            DataFusionError::Plan("Invalid function 'lower'".into()),
            "rule query.functions: function lower is not allowed",
            true,
        ),
        (
            DataFusionError::Plan("table 'public.secret_table' not found".into()),
            "rule query.tables: secret_table is not a dataset of agreement retail-media-demo; queries read the agreement's datasets only",
            true,
        ),
        (
            DataFusionError::Plan("table function 'generate_series' not found".into()),
            "rule query.tables: table functions are not allowed",
            true,
        ),
        (
            DataFusionError::SchemaError(
                Box::new(datafusion::common::SchemaError::FieldNotFound {
                    field: Box::new(datafusion::common::Column::from_name("jane@example.com")),
                    valid_fields: vec![],
                }),
                Box::new(None),
            ),
            "rule sql.columns: a column in the query does not exist in its tables",
            false,
        ),
        (
            DataFusionError::NotImplemented("Unsupported ast node 'x = 42'".into()),
            "rule query.shape: this SQL construct is not supported",
            true,
        ),
        (
            DataFusionError::Execution("value 'jane@example.com' overflowed".into()),
            "rule sql.plan: the query could not be planned",
            false,
        ),
    ];
    let failure = engine_failure(&DataFusionError::Execution(
        "Cannot cast value 'jane@example.com'".into(),
    ));
    assert_eq!(failure, "DataFusion execution error");
    for (err, text, policy_refusal) in cases {
        let v = planning_refusal(&err, &policy, "SELECT 1");
        assert_eq!(v.to_string(), text);
        assert_eq!(v.policy, policy_refusal, "{text}");
        assert!(!v.to_string().contains("jane"), "{v}");
    }
}
