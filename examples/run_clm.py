#!/usr/bin/env python
"""Train or fine-tune an lm-lstm model with the interface of transformers' `examples/pytorch/language-modeling/run_clm.py`.

From scratch (a tokenizer is trained on the data unless --tokenizer_name is given):

    python examples/run_clm.py --train_file corpus.txt --do_train --do_eval --output_dir out \
        --config_overrides "hidden_size=256,num_hidden_layers=2" --block_size 128 --max_steps 500

Fine-tuning a saved lm-lstm folder (its tokenizer is reused):

    python examples/run_clm.py --model_name_or_path out --train_file more.txt --do_train --do_eval \
        --output_dir out-finetuned --learning_rate 1e-3 --max_steps 200

Writes the model folder with train_results.json, eval_results.json (with perplexity) and all_results.json.
All data, tokenizer and training code is lm-lstm's own (`lm_lstm.training.train`).
"""

import sys

from transformers import HfArgumentParser

from lm_lstm.arguments import CardArguments, DataArguments, LSTMTrainingArguments, ModelArguments
from lm_lstm.training import train


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, LSTMTrainingArguments, CardArguments))
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        model_args, data_args, training_args, card_args = parser.parse_json_file(json_file=sys.argv[1])
    else:
        model_args, data_args, training_args, card_args = parser.parse_args_into_dataclasses()
    if not (training_args.do_train or training_args.do_eval):
        parser.error("nothing to do: pass --do_train and/or --do_eval")
    result = train(
        model_args, data_args, training_args, card_args, do_train=training_args.do_train, do_eval=training_args.do_eval
    )
    if result.is_main_process and "perplexity" in result.metrics:
        print(f"perplexity = {result.metrics['perplexity']:.4f}")


if __name__ == "__main__":
    main()
