//! Chat templates rendered as `transformers`' `apply_chat_template` renders them (fixtures from
//! `scripts/make_chat_template_fixtures.py`): the text with and without the generation prompt,
//! the token ids with the byte-level BPE tokenizer of the tiny GGUF, and the template's own
//! `raise_exception` as an error carrying its message.

use crate::common::fixtures;

use peft_llama::{ChatMessage, ChatTemplate, LlamaTokenizer};

#[test]
fn templates_render_and_tokenize_as_transformers_apply_chat_template() {
    let data: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap(),
    )
    .unwrap();
    let tokenizer = LlamaTokenizer::load(fixtures().join("gguf/tiny-bpe.gguf")).unwrap();
    let token = |key: &str| data[key].as_str().map(str::to_string);
    let cases = data["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let mut rendered = 0;
    for case in cases {
        let name = case["template"].as_str().unwrap();
        let template = ChatTemplate::new(data["templates"][name].as_str().unwrap(), name)
            .with_special_tokens(token("bos_token"), token("eos_token"));
        let messages: Vec<ChatMessage> = serde_json::from_value(case["messages"].clone()).unwrap();
        let generation = case["add_generation_prompt"].as_bool().unwrap();
        let what = format!("{name} {messages:?} generation={generation}");
        match case.get("error").and_then(|e| e.as_str()) {
            Some(message) => {
                let err = template
                    .render(&messages, generation)
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(message), "{what}: {err}");
            }
            None => {
                let text = template.render(&messages, generation).unwrap();
                assert_eq!(text, case["text"].as_str().unwrap(), "{what}");
                let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
                assert_eq!(
                    template.encode(&tokenizer, &messages, generation).unwrap(),
                    ids,
                    "{what}"
                );
                rendered += 1;
            }
        }
    }
    assert!(rendered >= 38);
}

#[test]
fn a_gguf_file_and_a_model_directory_give_their_templates() {
    let path = fixtures().join("gguf/tiny-bpe.gguf");
    let tokenizer = LlamaTokenizer::load(&path).unwrap();
    let template = ChatTemplate::from_model(&path, &tokenizer)
        .unwrap()
        .unwrap();
    let ids = template
        .encode(&tokenizer, &[ChatMessage::new("user", "Hi!")], true)
        .unwrap();
    // `<|im_start|>` and `<|im_end|>` are single special tokens, not pieces.
    let start = tokenizer.encode("<|im_start|>", false).unwrap();
    assert_eq!(start.len(), 1);
    assert_eq!(ids.iter().filter(|&&id| id == start[0]).count(), 3);
    // stories260k ships no template.
    let stories = crate::common::stories260k();
    let tokenizer = LlamaTokenizer::load(&stories).unwrap();
    assert!(ChatTemplate::from_model(&stories, &tokenizer)
        .unwrap()
        .is_none());
    // A directory's tokenizer_config.json template, named `default` among several.
    let dir = std::env::temp_dir().join(format!("peft-chat-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": [{"name": "tool_use", "template": "T"},
                               {"name": "default", "template": "{{ bos_token }}D"}]}"#,
    )
    .unwrap();
    let template = ChatTemplate::from_model(&dir, &tokenizer).unwrap().unwrap();
    assert_eq!(template.render(&[], false).unwrap(), "<s>D");
    std::fs::remove_dir_all(&dir).unwrap();
}
