"""A two-predictor DSPy program (one predictor called in a loop), trained with mmGRPO on the
embedded model: `pip install -e ".[dspy]"`, then `python examples/dspy_notes.py` (about 9 minutes
on 2 CPU cores). The 135M model follows XMLAdapter's format once it sees a demo or two per predictor; DSPy's
BootstrapFewShot picks the demos first, then 4 mmGRPO steps train the weights with them."""
import dspy

import mmgrpo


class Notes(dspy.Module):
    def __init__(self):
        super().__init__()
        self.query = dspy.Predict("topic, notes -> query")
        self.answer = dspy.Predict("topic, notes -> answer")

    def forward(self, topic):
        notes = ""
        for _ in range(2):  # `query` is called twice: invocation indices 0 and 1
            notes += "\n- " + self.query(topic=topic, notes=notes or "(none)").query
        return self.answer(topic=topic, notes=notes)


def short_answer(example, pred, trace=None):  # DSPy's metric signature
    return len(pred.answer.split()) <= 4


topics = ["the sea", "music", "cats", "winter", "bread", "trains", "the moon", "gardens", "rain", "bells"]
data = [dspy.Example(topic=t, query=f"{t} facts", answer=f"{t.capitalize()} is nice.").with_inputs("topic")
        for t in topics]

if __name__ == "__main__":
    program = Notes()
    program.query.demos = [dspy.Example(topic="the sun", notes="(none)", query="sun light")]
    program.answer.demos = [dspy.Example(topic="the sun", notes="\n- sun light", answer="The sun is hot.")]
    with dspy.context(adapter=dspy.XMLAdapter()):
        result = mmgrpo.optimize(program, train=data[:6], dev=data[6:], metric=short_answer,
                                 strategy="dspy.BootstrapFewShot -> weights",
                                 config={"rollout": {"batch_examples": 2, "group_size": 6, "max_tokens": 32},
                                         "prompts": {"max_demos": 2, "train_examples": 6},
                                         "run": {"steps": 4, "eval_every": 2, "progress": False}})
    print(result(topic="rivers"))
    print(result.evaluate(data[6:], short_answer))
    result.save("runs/dspy-notes-result")  # mmgrpo.load("runs/dspy-notes-result", program=Notes())
