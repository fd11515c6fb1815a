rule train:
    input:
        data="results/sft/{split}/{variant}.parquet",
        model=model_files(config["train"]["model"]),
        template=config["train"]["chat_template"] or [],
    output:
        adapter=directory("results/models/{split}/{variant}/adapter"),
        log_csv="results/models/{split}/{variant}/train_log.csv",
        metrics="results/models/{split}/{variant}/train_metrics.json",
        loss=report(
            "results/models/{split}/{variant}/loss.png",
            category="Training",
            subcategory="{split}",
            labels={"variant": "{variant}", "split": "{split}"},
            caption="../report/loss.rst",
        ),
    log:
        "logs/train/{split}/{variant}.log",
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        settings=result_settings("train"),
        run=run_settings("train"),
        out_dir="results/models/{split}/{variant}",
        checkpoints="results/checkpoints/{split}/{variant}",
    shell:
        "python -m synthpert train --data {input.data} --settings {params.settings:q} "
        "--run {params.run:q} --out-dir {params.out_dir} --checkpoint-dir {params.checkpoints} 2> {log}"
