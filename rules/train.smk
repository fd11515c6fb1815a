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


rule grpo:
    input:
        split_file="results/data/splits/{split}.parquet",
        trace_sample="results/traces/{split}/sample.parquet",
        adapter=rl_start_adapter,
        model=model_files(config["train"]["model"]),
    output:
        adapter=directory("results/models/{split}/{rl_row}/adapter"),
        log_csv="results/models/{split}/{rl_row}/grpo_log.csv",
        metrics="results/models/{split}/{rl_row}/grpo_metrics.json",
        reward=report(
            "results/models/{split}/{rl_row}/reward.png",
            category="Training",
            subcategory="{split}",
            labels={"variant": "{rl_row}", "split": "{split}", "curve": "reward"},
            caption="../report/grpo.rst",
        ),
        kl=report(
            "results/models/{split}/{rl_row}/kl.png",
            category="Training",
            subcategory="{split}",
            labels={"variant": "{rl_row}", "split": "{split}", "curve": "KL"},
            caption="../report/grpo.rst",
        ),
    log:
        "logs/grpo/{split}/{rl_row}.log",
    wildcard_constraints:
        rl_row="|".join(rows.RL_ROWS),
    conda:
        "../envs/train.yaml"
    resources:
        gpu=1,
    params:
        settings=result_settings("grpo"),
        run=run_settings("grpo"),
        out_dir="results/models/{split}/{rl_row}",
        checkpoints="results/checkpoints/{split}/{rl_row}",
    shell:
        "python -m synthpert grpo --split-file {input.split_file} --trace-sample {input.trace_sample} "
        "--adapter {input.adapter} --settings {params.settings:q} --run {params.run:q} "
        "--out-dir {params.out_dir} --checkpoint-dir {params.checkpoints} 2> {log}"
