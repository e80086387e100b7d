"""The PPO runner's built-in task metric."""

from hpalign.rl.runner import builtin_task_sums


def test_builtin_task_counts_exact_and_brief_answers_to_arithmetic_questions():
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    prompts = [question, question, [{"role": "user", "content": "What colour is snow?"}],
               [{"role": "user", "content": "What is 4 x 5?"}]]
    texts = ["2 + 3 = 5.",
             "The sum of two and three, which we compute by counting on from two, is 5, as any child will tell you.",
             "White 🎉", "21"]
    # arithmetic prompts 3; exact and brief 1 (the first); exact 2 (the long one too); emoji 1
    assert builtin_task_sums(prompts, texts, [1.0] * 4) == [3.0, 1.0, 2.0, 1.0]
    assert builtin_task_sums(prompts, texts, [0.0, 1.0, 1.0, 1.0]) == [2.0, 0.0, 1.0, 1.0]  # weight 0: a repeat
