rule plan:
    input:
        samples=expand("results/traces/{split}/sample.parquet", split=SPLITS),
        questions=expand("results/eval/{split}/questions.parquet", split=SPLITS),
        evidence=(
            expand("results/evidence/{split}.parquet", split=SPLITS)
            if EVIDENCE_ROWS
            else []
        ),
        trace_evidence=(
            expand("results/evidence/{split}.traces.parquet", split=SPLITS)
            if rows.evidence_traces(config)
            else []
        ),
        models=plan_model_files(),
        logs=existing_request_logs,
    output:
        "results/plan.csv",
    log:
        "logs/plan.log",
    localrule: True
    conda:
        "../envs/llm.yaml"
    params:
        # A short digest re-runs the plan when the configuration changes; the JSON itself is
        # passed as a function of resources, never compared (its diff would flood the log).
        config_digest=hashlib.sha256(
            json.dumps(config, sort_keys=True).encode()
        ).hexdigest()[:16],
        config=lambda wildcards, resources: json.dumps(config, sort_keys=True),
    shell:
        "python -m synthpert plan --config-json {params.config:q} --results results --out {output} 2> {log}"
