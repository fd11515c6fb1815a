rule plan:
    input:
        samples=expand("results/traces/{split}/sample.parquet", split=SPLITS),
        questions=expand("results/eval/{split}/questions.parquet", split=SPLITS),
        models=plan_model_files(),
    output:
        "results/plan.csv",
    log:
        "logs/plan.log",
    localrule: True
    conda:
        "../envs/llm.yaml"
    params:
        config=json.dumps(config, sort_keys=True),
        logs=request_logs_digest,
    shell:
        "python -m synthpert plan --config-json {params.config:q} --results results --out {output} 2> {log}"
